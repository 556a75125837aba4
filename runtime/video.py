"""Frame sources: a folder of frames, a video file, a camera or a network stream.

    source = open_frames(path, fps=None, realtime=False, open_timeout=10.0, read_timeout=None)

`path` is a folder of JPEG/PNG frames, a video file, a camera (/dev/videoN, a V4L2 device
node such as /dev/v4l/by-id/..., or a bare number N for /dev/videoN) or a URL (rtsp, rtsps,
http, https, udp, tcp, rtmp, ...; see fastsam2.runtime.live). Anything unusable raises
InputError (SourceError, its subclass, for cameras and streams) with one line, so does a
first frame with a side over MAX_INPUT_SIDE (4096 px; fastsam2.runtime.frame_source).

Modules: frame_source (the contract below, Frame, dropped-frame records, the size bound),
video (folders and open_frames), video_file (VideoSource), live_target and live (cameras and
streams).

Every source has: kind ("folder" | "video" | "camera" | "stream"), name, width, height,
fps (nominal), num_frames (the declared count, None when nothing is declared or the source is
live), live (a camera or stream: no end), frame_names (folders only), and:

- frames(): an iterator of Frame(index, timestamp, rgb). rgb is uint8 HxWx3 C-contiguous at
  the first frame's size; index counts every frame the source produced, dropped ones included;
  timestamp is in seconds (file: from pts, relative to the stream's start; live: from pts
  relative to the first frame, or arrival time where the stream carries no timestamps;
  folder: index / fps). Iterating the source itself yields (index, rgb) pairs.
- realtime: True only for a live source opened with realtime=True (then frames() hands out
  the newest frame and drops the ones that arrived while the consumer was busy).
- dropped, dropped_ranges: how many frames realtime dropped, and which, as inclusive
  [first, last] index ranges (the newest DROP_RANGES_KEPT ranges; `dropped` stays exact).
  0 and [] for every other source.
- decode_errors: damaged packets the decoder rejected and that were skipped.
- stop(): thread-safe; the iteration in progress (or the next) ends at the next frame. Sticky.
- check_complete(): after a file was read to its end, raises IncompleteInputError (exit 3) if
  the file ended before its container said it would (see VideoSource); a no-op otherwise
  (folders, live sources, a pass that was stopped or broken off early). Call it after the
  loop, once the outputs of the frames read are written: they are complete and are kept.
- close() / with-block: releases the decoder (and a live source's reader thread).

Sources never keep more than the frames they are about to hand out; memory stays flat
however long the video is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError
# the contract and what every source shares live in frame_source (live.py builds on it too);
# re-exported here, where callers have always imported them from
from .frame_source import (  # noqa: F401
    DEFAULT_FOLDER_FPS,
    DROP_RANGES_KEPT,
    MAX_INPUT_SIDE,
    DropRecord,
    Frame,
    FrameSource,
    check_input_size,
)
from .live import LiveSource, live_target
from .video_file import VideoSource  # noqa: F401

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def natural_key(name: str) -> list:
    """Sort key where runs of digits compare as numbers: 2.jpg < 10.jpg.

    SAM2 sorts frame folders by int(stem); for numeric names this agrees with it, and it still
    gives a stable order for names like frame_2.jpg that int() would reject.
    """
    parts = re.split(r"(\d+)", name)
    return [(0, int(p), p) if p.isdigit() else (1, 0, p.lower()) for p in parts if p != ""]



def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            # the header's size, before a huge frame is decoded
            check_input_size(im.width, im.height, f"frame {path}")
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
        super().__init__()
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

    def frames(self) -> Iterator[Frame]:
        for i, f in enumerate(self.files):
            if self.stopped:
                return
            if i == 0 and self._first is not None:
                rgb, self._first = self._first, None
            else:
                rgb = _read_image(f)
            if rgb.shape[:2] != (self.height, self.width):
                h, w = rgb.shape[:2]
                raise InputError(
                    f"frame {f} is {w}x{h} but the first frame is {self.width}x{self.height}"
                )
            yield Frame(i, i / self.fps, rgb)

    def close(self) -> None:
        self._first = None


def open_frames(path: str | Path, fps: float | None = None, realtime: bool = False,
                open_timeout: float = 10.0, read_timeout: float | None = None) -> FrameSource:
    """Open a frames folder, a video file, a camera or a stream URL (see the module docstring).

    fps: the rate of a folder (which carries none; default 24), the rate to ask a camera for,
    and the nominal rate of a stream that declares none; a video file keeps its own rate.
    realtime: live sources only (files hand out every frame anyway): keep only the newest
    frame, dropping the ones that arrive while the consumer is busy.
    open_timeout / read_timeout (default: open_timeout): seconds a live source may take to
    deliver its first frame / the next one before SourceError.
    """
    target = live_target(path)
    if target is not None:
        return LiveSource(target, fps=fps, realtime=realtime, open_timeout=open_timeout,
                          read_timeout=read_timeout)
    if str(path).lower().startswith("file://"):
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(str(path)).path)
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or folder: {p}")
    if p.is_dir():
        return FolderSource(p, fps=DEFAULT_FOLDER_FPS if fps is None else fps)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{p} is a single image; pass the folder of frames or a video")
    return VideoSource(p)
