"""What the runtime writes: palette PNG masks, JSON, and mp4 videos, each written atomically.

Every file is written to a temporary name in its own folder and renamed into place, so a crash
or Ctrl-C mid-run leaves either the whole file or none of it, never half of one.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from fastsam2.runtime.errors import InputError, OutputError
# one output folder = one run: re-exported for the CLIs
from fastsam2.runtime.run_folder import RUN_OUTPUTS, RunFolder  # noqa: F401


def _davis_palette() -> np.ndarray:
    # The PASCAL VOC / DAVIS colour map: the bits of the index are dealt out to R, G, B from
    # the most significant bit down, so small ids get distinct, saturated colours.
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


DAVIS_PALETTE: np.ndarray = _davis_palette()
DAVIS_PALETTE.setflags(write=False)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _temp_in(path: Path, suffix: str = ".tmp") -> Path:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        # mkstemp makes 0600 files; outputs should get the mode any other new file would.
        os.chmod(tmp, 0o666 & ~_UMASK)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    return Path(tmp)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def ensure_writable_dir(folder) -> Path:
    """Create `folder` if needed; OutputError (one line) when that fails or it is read-only."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write to {folder}")
    return folder


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path so that readers see the old file or the whole new one."""
    path = Path(path)
    tmp = _temp_in(path)
    try:
        # No fsync: rename already protects against a crashed or killed process, and an fsync
        # per mask PNG would cost more than the tracking on long videos.
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def finite_or_none(x, ndigits: int | None = None):
    """x as a float (rounded to ndigits), or None where it is NaN or infinite: JSON outputs are
    strict, and null is what strict JSON has for "no number" (an object score of a diverged
    frame, fps over zero seconds, a video whose container declares no frame rate)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, ndigits) if ndigits is not None else x


def _nonfinite_at(obj, where: str = "") -> str | None:
    """Where in obj the first non-finite float is (for the error message), or None."""
    stack = [(obj, where)]
    while stack:
        v, w = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return w or "the value"
        if isinstance(v, dict):
            stack.extend((x, f"{w}.{k}" if w else str(k)) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{w}[{i}]") for i, x in enumerate(v))
    return None


def atomic_write_json(path: str | Path, obj) -> None:
    """Strict JSON (RFC 8259): a NaN or Infinity is a bug where the value was made (map it with
    finite_or_none there); it raises ValueError naming the field, and nothing is written."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError:
        raise ValueError(f"{path}: non-finite number at {_nonfinite_at(obj)}; "
                         "map it to None where it is produced (outputs.finite_or_none)") from None
    atomic_write_bytes(path, text.encode("utf-8"))


def _as_index_mask(index_mask: np.ndarray) -> np.ndarray:
    m = np.asarray(index_mask)
    if m.ndim != 2:
        raise ValueError(f"index mask must be HxW, got shape {m.shape}")
    if m.dtype == np.uint8:
        return np.ascontiguousarray(m)
    if m.dtype.kind not in "biu" or (m.size and (m.min() < 0 or m.max() > 255)):
        raise ValueError(f"index mask must hold ids 0..255, got dtype {m.dtype}")
    return np.ascontiguousarray(m.astype(np.uint8))


def palette_png_bytes(index_mask: np.ndarray) -> bytes:
    from PIL import Image

    im = Image.fromarray(_as_index_mask(index_mask), mode="P")
    im.putpalette(DAVIS_PALETTE.tobytes())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_palette_png(path: str | Path, index_mask: np.ndarray) -> None:
    """A DAVIS-style mask: mode "P" PNG whose pixel values are object ids (0 = background)."""
    atomic_write_bytes(path, palette_png_bytes(index_mask))


def read_palette_png(path: str | Path) -> np.ndarray:
    """The object ids of a palette (or greyscale) PNG, as uint8 HxW; colours are ignored."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise InputError(f"mask {path} is mode {im.mode}; expected a palette PNG")
            # np.asarray on a "P" image gives the indices; convert() would map to colours.
            return np.array(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read mask {path}: {e}") from e


def _open_encoder(container, fps: float, width: int, height: int):
    import av

    rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(24)
    for codec, options in (("libx264", {"crf": "18", "preset": "veryfast"}), ("mpeg4", {})):
        try:
            stream = container.add_stream(codec, rate=rate)
        except (av.codec.codec.UnknownCodecError, av.FFmpegError, ValueError):
            continue
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":
            # mpeg4's default bit rate is far too low for masks to stay readable.
            stream.bit_rate = max(2_000_000, width * height * 8)
        stream.options = options
        stream.codec_context.time_base = Fraction(1) / rate
        return stream
    raise OutputError("this PyAV build has neither the libx264 nor the mpeg4 encoder")


class Mp4Writer:
    """An mp4 (H.264 when available, else MPEG-4 Part 2) written to a temp file, renamed on close.

    yuv420p needs even sizes, so an odd last row/column is cropped from every frame.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float):
        import av

        if width < 2 or height < 2:
            raise ValueError(f"video size {width}x{height} is too small to encode")
        self.path = Path(path)
        self.width, self.height = int(width), int(height)
        self.out_width, self.out_height = self.width & ~1, self.height & ~1
        self.fps = float(fps)
        self.frames_written = 0
        self._tmp = _temp_in(self.path, suffix=".mp4")
        try:
            self._container = av.open(str(self._tmp), "w", format="mp4")
            self._stream = _open_encoder(self._container, self.fps, self.out_width, self.out_height)
        except BaseException:
            self._abort()
            raise
        self.codec = self._stream.codec_context.name

    def write(self, rgb: np.ndarray) -> None:
        import av

        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(
                f"frame must be uint8 {self.height}x{self.width}x3, got {rgb.dtype} {rgb.shape}"
            )
        frame = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(rgb[: self.out_height, : self.out_width]), format="rgb24"
        )
        frame.pts = self.frames_written
        frame.time_base = self._stream.codec_context.time_base
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and move the file into place. Safe to call twice."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
        except OSError as e:
            self._abort()
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            try:
                container.close()
            except Exception:
                pass  # the file is being thrown away; a failing trailer write does not matter
        _remove_quietly(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def blend_masks(rgb: np.ndarray, index_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """rgb with each object's pixels mixed with its palette colour; background untouched."""
    m = _as_index_mask(index_mask)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask is {m.shape} but frame is {rgb.shape[:2]}")
    colours = DAVIS_PALETTE[m].astype(np.float32)
    mixed = rgb.astype(np.float32) * (1.0 - alpha) + colours * alpha
    out = np.where((m > 0)[..., None], np.rint(mixed).astype(np.uint8), rgb)
    return np.ascontiguousarray(out)


# What the overlay draws on top of the tinted masks (a user checks the overlay first):
CLICK_COLOURS = {"points": (0, 220, 0), "neg_points": (230, 0, 0)}  # positive green, negative red
MARK_OUTLINE = (255, 255, 255)  # around clicks and labels, so they read on any background


def _mark_sizes(height: int, width: int) -> tuple[int, int]:
    """(click radius, label font size) in pixels for a frame of this size."""
    side = min(height, width)
    return max(4, side // 50), max(10, side // 24)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # the small bitmap font: still legible


def draw_prompts(rgb: np.ndarray, prompts) -> np.ndarray:
    """rgb with the prompts given on this frame drawn in: positive clicks as green discs with a
    "+", negative ones as red discs with a "-", boxes as rectangles in the object's palette
    colour. `prompts`: entries as results.json lists them ({"object", "points", "neg_points",
    "box", "start": {"point"}} in input pixels; a text prompt's start point counts as a click)."""
    prompts = [p for p in prompts or () if p]
    if not prompts:
        return rgb
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(im)
    r, _ = _mark_sizes(rgb.shape[0], rgb.shape[1])
    for p in prompts:
        box = p.get("box")
        if box is not None:
            colour = tuple(int(c) for c in DAVIS_PALETTE[int(p.get("object", 1)) % 256])
            x0, y0, x1, y1 = (float(v) for v in box)
            draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=MARK_OUTLINE, width=1)
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=max(2, r // 2))
        start = (p.get("start") or {}).get("point")
        for key, points in (("points", list(p.get("points") or ()) + ([start] if start else [])),
                            ("neg_points", p.get("neg_points") or ())):
            for x, y in points:
                x, y = float(x), float(y)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=CLICK_COLOURS[key], outline=MARK_OUTLINE)
                arm = max(1, r // 2)
                draw.line([x - arm, y, x + arm, y], fill=MARK_OUTLINE)
                if key == "points":
                    draw.line([x, y - arm, x, y + arm], fill=MARK_OUTLINE)
    return np.asarray(im)


def object_label_boxes(index_mask: np.ndarray) -> dict:
    """{object id: [x0, y0, x1, y1]} of each object's mask (inclusive pixels), ids ascending."""
    m = _as_index_mask(index_mask)
    counts = np.bincount(m.ravel(), minlength=256)
    boxes = {}
    for obj in np.flatnonzero(counts[1:]) + 1:
        ys, xs = np.nonzero(m == obj)
        boxes[int(obj)] = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    return boxes


def draw_object_ids(rgb: np.ndarray, index_mask: np.ndarray) -> np.ndarray:
    """rgb with each object's id written next to its mask: a label in the object's palette
    colour just above the mask's top-left corner (inside it where the frame ends there)."""
    boxes = object_label_boxes(index_mask)
    if not boxes:
        return rgb
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(im)
    h, w = rgb.shape[:2]
    font = _font(_mark_sizes(h, w)[1])
    for obj, (x0, y0, _, _) in boxes.items():
        text = str(obj)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        x = min(max(0, x0), max(0, w - tw))
        y = y0 - th if y0 - th >= 0 else min(y0, max(0, h - th))
        colour = tuple(int(c) for c in DAVIS_PALETTE[obj])
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=colour, outline=MARK_OUTLINE)
        draw.text((x + 2 - left, y + 2 - top), text, fill=ink, font=font)
    return np.asarray(im)


class OverlayWriter(Mp4Writer):
    """The video the user watches: each frame with its object masks tinted in, each object's id
    next to its mask, and the clicks and boxes given on that frame."""

    alpha = 0.5

    def write(self, rgb: np.ndarray, index_mask: np.ndarray, prompts=()) -> None:  # type: ignore[override]
        """prompts: the prompts given on this frame, as results.json's "prompts" entries."""
        frame = draw_object_ids(blend_masks(rgb, index_mask, self.alpha), index_mask)
        super().write(np.ascontiguousarray(draw_prompts(frame, prompts)))
