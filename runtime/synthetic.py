"""Generated videos with exact ground truth, because the project cannot download DAVIS or SA-V.

Textured shapes (circle, square, triangle) move smoothly over a textured, slowly drifting
background; a same-colour distractor and an occluder bar crossing the scene make tracking
non-trivial. The output is a frame folder or an mp4, palette-PNG index masks, and a
first-frame point and box per object. numpy + pillow + PyAV only: the torch-free demo uses it.

    python -m fastsam2.calibration.synthetic demo/ --frames 48 --size 640x480

The command line writes sizes WIDTHxHEIGHT (as ffmpeg, v4l2 and the summary line do); the
Python API takes size=(H, W), numpy's order.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from .cli_edge import cli_errors, command_class
from .console import messages
from .errors import InputError
from .outputs import Mp4Writer, read_palette_png, write_palette_png

SHAPES = ("circle", "square", "triangle")
# Saturated colours that stay apart after JPEG / yuv420p chroma subsampling.
COLOURS = np.array(
    [
        (220, 40, 40), (40, 200, 60), (50, 80, 230), (235, 210, 40),
        (210, 50, 210), (40, 210, 220), (245, 140, 30), (130, 60, 200),
    ],
    dtype=np.float32,
)
FPS = 24.0


@dataclass
class SyntheticVideo:
    path: Path  # the folder everything was written under
    frames_dir_or_file: Path  # frames folder (jpg/png) or the .mp4
    masks: Path  # folder of palette PNGs 00000.png...; pixel value = object id
    first_frame_points: dict[int, tuple[int, int]]  # (x, y) deep inside each object
    first_frame_boxes: dict[int, tuple[int, int, int, int]]  # x0, y0, x1, y1 inclusive
    num_frames: int
    height: int
    width: int
    fps: float = FPS

    def read_mask(self, index: int) -> np.ndarray:
        return read_palette_png(self.masks / f"{index:05d}.png")


@dataclass
class _Shape:
    kind: str
    colour: np.ndarray
    start: np.ndarray  # (x, y) at frame 0
    end: np.ndarray  # (x, y) the linear part reaches on the last frame
    amp: np.ndarray  # sinusoidal wobble on top of the line, pixels
    cycles: float  # wobble periods over the whole video
    phase: float
    radius: float
    stripe_angle: float
    stripe_period: float

    def centre(self, u: float) -> np.ndarray:
        """Position at u in [0, 1] along the video; the wobble starts at 0 so frame 0 is start."""
        angle = 2 * math.pi * self.cycles * u + self.phase
        wobble = self.amp * (math.sin(angle) - math.sin(self.phase))
        return self.start + (self.end - self.start) * u + wobble

    def size(self, u: float) -> float:
        return self.radius * (1.0 + 0.08 * math.sin(2 * math.pi * u + self.phase))

    def mask(self, u: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        cx, cy = self.centre(u)
        r = self.size(u)
        dx, dy = xx - cx, yy - cy
        if self.kind == "circle":
            return dx * dx + dy * dy <= r * r
        if self.kind == "square":
            return (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
        # Upward equilateral triangle, circumradius 1.25 r so its area is near the others'.
        R = 1.25 * r
        angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        verts = [(R * math.cos(a), R * math.sin(a)) for a in angles]
        inside = np.ones(np.broadcast(dx, dy).shape, dtype=bool)
        for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):
            inside &= (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0) >= 0
        return inside

    def texture(self, u: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        # Stripes fixed to the shape, so the texture moves with it like a real surface.
        cx, cy = self.centre(u)
        t = ((xx - cx) * math.cos(self.stripe_angle) + (yy - cy) * math.sin(self.stripe_angle))
        shade = 0.78 + 0.22 * np.sin(2 * math.pi * t / self.stripe_period)
        return shade[..., None] * self.colour


class _Scene:
    """Everything random is drawn here, once, from the seed; rendering is then pure."""

    def __init__(self, num_frames, size, seed, objects, distractors, occlusion):
        if num_frames < 1:
            raise ValueError("num_frames must be at least 1")
        if not 1 <= objects <= len(COLOURS):
            raise ValueError(f"objects must be 1..{len(COLOURS)}")
        self.n = int(num_frames)
        self.h, self.w = (int(v) for v in size)
        if min(self.h, self.w) < 32:
            raise ValueError("frames must be at least 32x32")
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        base = min(self.h, self.w)
        colours = COLOURS[rng.permutation(len(COLOURS))[:objects]]
        first_kind = int(rng.integers(len(SHAPES)))
        specs = [(SHAPES[(first_kind + i) % 3], colours[i]) for i in range(objects)]
        # Distractors copy object 1's shape and colour; only position tells them apart.
        specs += [(specs[0][0], colours[0]) for _ in range(distractors)]
        self.shapes: list[_Shape] = []
        for kind, colour in specs:
            radius = base * rng.uniform(0.09, 0.13)
            amp = rng.uniform(0.01, 0.04, size=2) * base
            self.shapes.append(
                _Shape(kind, colour, None, None, amp, rng.uniform(0.5, 1.5),
                       rng.uniform(0, 2 * math.pi), radius, rng.uniform(0, math.pi),
                       rng.uniform(6, 12))
            )
        self._place()
        self.objects = objects
        self.occlusion = occlusion
        self.bar_width = max(8, self.w // 12)
        # The background is a smooth colour field larger than the frame, panned slowly.
        self.pad = max(6, base // 12)
        bh, bw = self.h + 2 * self.pad, self.w + 2 * self.pad
        from PIL import Image

        coarse = rng.uniform(60, 170, size=(6, 8, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((bw, bh), Image.BICUBIC), np.float32)
        self.background = smooth + rng.normal(0, 8, size=(bh, bw, 3)).astype(np.float32)
        self.yy, self.xx = np.mgrid[0 : self.h, 0 : self.w].astype(np.float32)

    def _place(self) -> None:
        rng, base = self.rng, min(self.h, self.w)
        placed: list[tuple[np.ndarray, float]] = []
        for s in self.shapes:
            m = 1.3 * s.radius + s.amp * 2 + 2  # scale and wobble never push it off-frame
            lo, hi = m, np.array([self.w, self.h]) - m
            hi = np.maximum(hi, lo + 1)
            for _ in range(200):
                start = rng.uniform(lo, hi)
                # Keep frame 0 free of overlaps so every first-frame prompt sees its whole object.
                if all(np.hypot(*(start - p[0])) > 1.3 * (s.radius + p[1]) for p in placed):
                    break
            travel = rng.uniform(-0.4, 0.4, size=2) * base
            s.start, s.end = start, np.clip(start + travel, lo, hi)
            placed.append((start, s.radius))

    def frame(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 and the index mask (visible pixels of each object) of frame t."""
        u = t / max(self.n - 1, 1)
        p = self.pad
        ox = p + int(round((p - 1) * math.sin(math.pi * u)))
        oy = p + int(round((p - 1) * math.sin(0.5 * math.pi * u)))
        img = self.background[oy : oy + self.h, ox : ox + self.w].copy()
        index = np.zeros((self.h, self.w), dtype=np.uint8)
        # Distractors first, so when they overlap an object the object is on top.
        order = list(range(self.objects, len(self.shapes))) + list(range(self.objects))
        for i in order:
            s = self.shapes[i]
            m = s.mask(u, self.xx, self.yy)
            img[m] = s.texture(u, self.xx[m], self.yy[m])
            index[m] = i + 1 if i < self.objects else 0
        if self.occlusion and self.n > 1:
            x0 = int(round(-self.bar_width + (self.w + self.bar_width) * u))
            lo, hi = max(x0, 0), min(x0 + self.bar_width, self.w)
            if hi > lo:
                stripes = 90 + 30 * (np.arange(self.h) // 6 % 2)
                img[:, lo:hi] = stripes[:, None, None]
                index[:, lo:hi] = 0
        img += self.rng.normal(0, 2.0, size=img.shape).astype(np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), index


def _deep_point(mask: np.ndarray) -> tuple[int, int]:
    """The pixel farthest inside the mask (by repeated 4-neighbour erosion), as (x, y)."""
    core = mask.copy()
    while True:
        e = core.copy()
        e[1:] &= core[:-1]
        e[:-1] &= core[1:]
        e[:, 1:] &= core[:, :-1]
        e[:, :-1] &= core[:, 1:]
        e[0], e[-1], e[:, 0], e[:, -1] = False, False, False, False
        if not e.any():
            break
        core = e
    ys, xs = np.nonzero(core)
    # Of the deepest pixels, the one nearest their centroid: stable under ties.
    k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return int(xs[k]), int(ys[k])


def _write_sequence(scene: _Scene, frames_target: Path, masks_dir: Path, fmt: str):
    from PIL import Image

    masks_dir.mkdir(parents=True, exist_ok=True)
    if fmt != "mp4":
        frames_target.mkdir(parents=True, exist_ok=True)
    points, boxes = {}, {}
    # The mp4 writer removes its half-written file if rendering fails part-way.
    with contextlib.ExitStack() as stack:
        writer = None
        if fmt == "mp4":
            writer = stack.enter_context(Mp4Writer(frames_target, scene.w, scene.h, FPS))
        for t in range(scene.n):
            rgb, index = scene.frame(t)
            if t == 0:
                for obj_id in range(1, scene.objects + 1):
                    m = index == obj_id
                    if not m.any():
                        raise RuntimeError(f"object {obj_id} is not visible on frame 0")
                    ys, xs = np.nonzero(m)
                    points[obj_id] = _deep_point(m)
                    boxes[obj_id] = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            if writer is not None:
                writer.write(rgb)
            elif fmt == "jpg":
                Image.fromarray(rgb).save(frames_target / f"{t:05d}.jpg", quality=95)
            else:
                Image.fromarray(rgb).save(frames_target / f"{t:05d}.png")
            write_palette_png(masks_dir / f"{t:05d}.png", index)
    return points, boxes


def make_video(
    out_dir: str | Path,
    num_frames: int = 12,
    size: tuple[int, int] = (240, 320),
    seed: int = 0,
    objects: int = 1,
    distractors: int = 1,
    fmt: str = "jpg",
    occlusion: bool = False,
) -> SyntheticVideo:
    """Write out_dir/frames/00000.jpg... (or out_dir/video.mp4) and out_dir/masks/00000.png...

    size is (H, W). Same arguments and seed give the same pixels. Frames are rendered and
    written one at a time, so long videos cost no more memory than short ones.
    """
    if fmt not in ("jpg", "png", "mp4"):
        raise ValueError(f"fmt must be jpg, png or mp4, not {fmt!r}")
    if fmt == "mp4" and (size[0] % 2 or size[1] % 2):
        # yuv420p would crop the last row/column and the masks would no longer line up.
        raise ValueError("mp4 needs an even height and width")
    scene = _Scene(num_frames, size, seed, objects, distractors, occlusion)  # checks the counts first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "video.mp4" if fmt == "mp4" else out / "frames"
    points, boxes = _write_sequence(scene, target, out / "masks", fmt)
    return SyntheticVideo(out, target, out / "masks", points, boxes, scene.n, scene.h, scene.w)


def make_davis_layout(
    root: str | Path, sequences: dict[str, dict], split: str = "val"
) -> dict[str, SyntheticVideo]:
    """A DAVIS-2017-shaped dataset the evaluation code can read like the real one.

    Writes JPEGImages/480p/<seq>/00000.jpg..., Annotations/480p/<seq>/00000.png... (every
    frame, like DAVIS train/val) and ImageSets/2017/<split>.txt. sequences maps a name to
    make_video keyword arguments (fmt is always jpg here).
    """
    root = Path(root)
    result = {}
    for name, kwargs in sequences.items():
        kw = {k: v for k, v in kwargs.items() if k != "fmt"}
        scene = _Scene(
            kw.pop("num_frames", 12), kw.pop("size", (240, 320)), kw.pop("seed", 0),
            kw.pop("objects", 1), kw.pop("distractors", 1), kw.pop("occlusion", False),
        )
        if kw:
            raise TypeError(f"unknown arguments for sequence {name!r}: {sorted(kw)}")
        frames = root / "JPEGImages" / "480p" / name
        masks = root / "Annotations" / "480p" / name
        points, boxes = _write_sequence(scene, frames, masks, "jpg")
        result[name] = SyntheticVideo(root, frames, masks, points, boxes, scene.n, scene.h, scene.w)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in sequences))
    return result


class _Size(click.ParamType):
    """WIDTHxHEIGHT on the command line (video tools' order) -> (H, W) for make_video."""

    name = "size"

    def convert(self, value, param, ctx):
        try:
            w, h = (int(v) for v in value.lower().split("x"))
        except ValueError:
            self.fail(f"size must be WIDTHxHEIGHT, e.g. 640x480, not {value[:40]!r}", param, ctx)
        return h, w


@click.command(cls=command_class(), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--frames", type=int, default=48, help="number of frames (default 48)")
@click.option("--size", type=_Size(), default="640x480", metavar="WIDTHxHEIGHT", help="WIDTHxHEIGHT in pixels (default 640x480)")
@click.option("--mp4", is_flag=True, help="write video.mp4 instead of JPEG frames")
@click.option("--seed", type=int, default=0)
@click.option("--objects", type=int, default=1)
@click.option("--distractors", type=int, default=1)
@click.option("--occlusion", is_flag=True, help="add a bar crossing the objects")
def _command(out, frames, size, mp4, seed, objects, distractors, occlusion):
    """Write a synthetic demo video with ground-truth masks.

    OUT: output folder."""
    with cli_errors(), messages(err=True):
        try:
            v = make_video(out, frames, size, seed, objects, distractors, "mp4" if mp4 else "jpg", occlusion)
        except ValueError as e:  # a size or count make_video cannot draw: the user's value
            raise InputError(str(e)) from None
    click.echo(f"wrote {v.num_frames} frames ({v.width}x{v.height}: width x height) to {v.frames_dir_or_file}")
    click.echo(f"ground-truth masks in {v.masks}")
    for obj_id, (x, y) in v.first_frame_points.items():
        x0, y0, x1, y1 = v.first_frame_boxes[obj_id]
        click.echo(f"object {obj_id}: point {x},{y}  box {x0},{y0},{x1},{y1}")


def main(argv: list[str] | None = None) -> int:
    """`python -m fastsam2.calibration.synthetic`: 0 once written; a bad value is one `error:`
    line and SystemExit(2)."""
    _command.main(argv, prog_name="python -m fastsam2.calibration.synthetic", standalone_mode=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
