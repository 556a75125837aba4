"""What every frame source is: the FrameSource contract (see fastsam2.runtime.video), the Frame
it hands out, the record of dropped frames, and the largest input fastsam2 accepts.

Files (runtime/video.py, runtime/video_file.py) and live sources (runtime/live.py) both build on
this module; neither imports the other's module for it.

Input size. MAX_INPUT_SIDE bounds the working size: a folder, video file, camera or stream
whose (first) frame has a side over it is refused with one line (InputError; SourceError for
live sources) before any frame is tracked. The working size is the first frame's: later frames
of another size (a stream that changes resolution) are scaled to it, so one huge frame costs
one decode and never sets the size of every later frame and output. 4096 px takes 4K video
(3840x2160, DCI 4096x2160); larger input is downscaled by the user first (ffmpeg -vf scale=).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Iterator, NamedTuple

import numpy as np

from .errors import InputError

DEFAULT_FOLDER_FPS = 24.0
DROP_RANGES_KEPT = 1000  # dropped_ranges keeps the newest ranges; `dropped` stays exact
MAX_INPUT_SIDE = 4096  # px, either side of the working size (see the module docstring)


def check_input_size(width: int, height: int, what: str, error: type[InputError] = InputError) -> None:
    """Refuse a frame size over MAX_INPUT_SIDE (read at call time: tests patch it down)."""
    if max(width, height) > MAX_INPUT_SIDE:
        raise error(f"{what} is {width}x{height}: over the {MAX_INPUT_SIDE} px maximum side; "
                    f"downscale it first (e.g. ffmpeg -vf scale=-2:{min(2160, MAX_INPUT_SIDE)})")


class Frame(NamedTuple):
    index: int  # counts every frame the source produced, dropped ones included
    timestamp: float  # seconds
    rgb: np.ndarray  # uint8 HxWx3


class DropRecord:
    """How many frames were dropped and which, as inclusive [first, last] index ranges.

    Not locked itself: live sources update and read it under their reader's lock.
    """

    def __init__(self, kept: int = DROP_RANGES_KEPT):
        self.count = 0
        self.ranges: deque[list[int]] = deque(maxlen=kept)

    def add(self, index: int) -> None:
        self.count += 1
        if self.ranges and self.ranges[-1][1] == index - 1:
            self.ranges[-1][1] = index
        else:
            self.ranges.append([index, index])


class FrameSource:
    """What the runtime reads frames from; see the module docstring for the contract."""

    kind: str = ""
    name: str = ""
    height: int = 0
    width: int = 0
    fps: float = DEFAULT_FOLDER_FPS
    num_frames: int | None = None
    live: bool = False
    realtime: bool = False  # True only for a live source opened with realtime=True
    decode_errors: int = 0  # damaged packets the decoder rejected and that were skipped

    def __init__(self) -> None:
        self._stop_event = threading.Event()
        self._drops = DropRecord()
        self._drops_lock = contextlib.nullcontext()  # a live source's reader updates _drops

    def frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for frame in self.frames():
            yield frame.index, frame.rgb

    @property
    def dropped(self) -> int:
        with self._drops_lock:
            return self._drops.count

    @property
    def dropped_ranges(self) -> list[list[int]]:
        """Inclusive [first, last] index ranges of the dropped frames, oldest first; only the
        newest DROP_RANGES_KEPT ranges are kept (`dropped` stays exact)."""
        with self._drops_lock:
            return [list(r) for r in self._drops.ranges]

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

    def stop(self) -> None:
        """End the iteration soon (at the next frame). Safe from any thread or signal handler."""
        self._stop_event.set()

    def check_complete(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        n = "?" if self.num_frames is None else self.num_frames
        return f"<{type(self).__name__} {self.name!r} {n} frames {self.width}x{self.height}>"
