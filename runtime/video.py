"""Frame sources: a folder of JPEG/PNG frames or a video file, decoded one frame at a time.

The runtime tracks videos of any length, so a source never keeps more than the frame it is
about to hand out; memory stays flat however long the video is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from fastsam2.runtime.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_FOLDER_FPS = 24.0


def natural_key(name: str) -> list:
    """Sort key where runs of digits compare as numbers: 2.jpg < 10.jpg.

    SAM2 sorts frame folders by int(stem); for numeric names this agrees with it, and it still
    gives a stable order for names like frame_2.jpg that int() would reject.
    """
    parts = re.split(r"(\d+)", name)
    return [(0, int(p), p) if p.isdigit() else (1, 0, p.lower()) for p in parts if p != ""]


class FrameSource:
    """What the runtime reads frames from. Iterating yields (index, rgb uint8 HxWx3)."""

    kind: str = ""
    name: str = ""
    height: int = 0
    width: int = 0
    fps: float = DEFAULT_FOLDER_FPS
    num_frames: int | None = None

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        n = "?" if self.num_frames is None else self.num_frames
        return f"<{type(self).__name__} {self.name!r} {n} frames {self.width}x{self.height}>"


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise InputError(f"frame {path} is too large to decode: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        # PIL reports truncated or non-image files as OSError (UnidentifiedImageError) and a
        # few malformed headers as ValueError/SyntaxError.
        raise InputError(f"cannot read frame {path}: {e}") from e
    return np.ascontiguousarray(rgb, dtype=np.uint8)


class FolderSource(FrameSource):
    """A folder of JPEG/PNG frames, in natural name order, all the size of the first."""

    kind = "folder"

    def __init__(self, path: Path, fps: float = DEFAULT_FOLDER_FPS):
        files = [
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise InputError(f"no .jpg/.jpeg/.png frames in folder {path}")
        files.sort(key=lambda p: natural_key(p.name))
        stems = [p.stem for p in files]
        if len(set(stems)) != len(stems):
            dup = next(s for s in stems if stems.count(s) > 1)
            # Outputs are named after the frame stem, so two frames would write one file.
            raise InputError(f"two frames share the name {dup!r} in {path}")
        self.path = path
        self.name = path.name
        self.files = files
        self.frame_names = stems
        self.num_frames = len(files)
        self.fps = float(fps)
        # Reading the first frame now gives the size and fails early on a bad folder; it is
        # handed out by the first iteration instead of being decoded again.
        self._first: np.ndarray | None = _read_image(files[0])
        self.height, self.width = self._first.shape[:2]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for i, f in enumerate(self.files):
            if i == 0 and self._first is not None:
                rgb, self._first = self._first, None
            else:
                rgb = _read_image(f)
            if rgb.shape[:2] != (self.height, self.width):
                h, w = rgb.shape[:2]
                raise InputError(
                    f"frame {f} is {w}x{h} but the first frame is {self.width}x{self.height}"
                )
            yield i, rgb

    def close(self) -> None:
        self._first = None


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, OSError)


class VideoSource(FrameSource):
    """Any file PyAV decodes; the first video stream, converted to rgb24."""

    kind = "video"

    def __init__(self, path: Path):
        try:
            import av
        except ImportError as e:  # pragma: no cover - av is a runtime dependency
            raise InputError(f"reading {path} needs PyAV: pip install av") from e
        self.path = path
        self.name = path.stem
        self._container = None
        self._frames = None
        self._first = None
        self._open()
        stream = self._stream
        self.num_frames = int(stream.frames) if stream.frames and stream.frames > 0 else None
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else DEFAULT_FOLDER_FPS
        # Peeking catches a video with no decodable frame at open rather than mid-run.
        self._first = self._next_frame()
        if self._first is None:
            self.close()
            raise InputError(f"video {path} has no decodable frames")
        self.height, self.width = self._first.height, self._first.width

    def _open(self) -> None:
        import av

        try:
            container = av.open(str(self.path), "r")
        except _av_errors() as e:
            raise InputError(f"cannot open video {self.path}: {_reason(e)}") from e
        if not container.streams.video:
            container.close()
            raise InputError(f"{self.path} has no video stream")
        self._container = container
        self._stream = container.streams.video[0]
        # Let FFmpeg use several threads per frame; the output order is unchanged.
        self._stream.thread_type = "AUTO"
        self._frames = container.decode(self._stream)

    def _next_frame(self):
        if self._frames is None:  # closed while a loop was still iterating
            return None
        try:
            return next(self._frames)
        except StopIteration:
            return None
        except _av_errors() as e:
            raise InputError(f"cannot decode video {self.path}: {_reason(e)}") from e

    def _to_rgb(self, frame) -> np.ndarray:
        # Scaling to the first frame's size keeps every frame the same shape even for the
        # rare stream whose resolution changes mid-way.
        rgb = frame.to_ndarray(format="rgb24", width=self.width, height=self.height)
        return np.ascontiguousarray(rgb, dtype=np.uint8)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        if self._first is None:
            # A second pass: start decoding again from the beginning.
            self.close()
            self._open()
            self._first = self._next_frame()
        index = 0
        frame, self._first = self._first, None
        while frame is not None:
            yield index, self._to_rgb(frame)
            index += 1
            frame = self._next_frame()

    def close(self) -> None:
        self._first = None
        self._frames = None
        if self._container is not None:
            self._container.close()
            self._container = None


def _reason(e: BaseException) -> str:
    # FFmpeg errors repeat the file name after the message; keep the line short.
    return getattr(e, "strerror", None) or str(e)


def open_frames(path: str | Path, fps: float | None = None) -> FrameSource:
    """Open a frame folder or a video file. Raises InputError for anything unusable.

    fps only applies to folders (which carry none); a video keeps its own rate.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or folder: {p}")
    if p.is_dir():
        return FolderSource(p, fps=DEFAULT_FOLDER_FPS if fps is None else fps)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{p} is a single image; pass the folder of frames or a video")
    return VideoSource(p)
