"""Frame sources: a folder of frames, a video file, a camera or a network stream.

    source = open_frames(path, fps=None, realtime=False, open_timeout=10.0, read_timeout=None)

`path` is a folder of JPEG/PNG frames, a video file, a camera (/dev/videoN, a V4L2 device
node such as /dev/v4l/by-id/..., or a bare number N for /dev/videoN) or a URL (rtsp, rtsps,
http, https, udp, tcp, rtmp, ...; see fastsam2.runtime.live). Anything unusable raises
InputError (SourceError, its subclass, for cameras and streams) with one line.

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

import contextlib
import re
import threading
from collections import deque
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from fastsam2.runtime.errors import IncompleteInputError, InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_FOLDER_FPS = 24.0
DROP_RANGES_KEPT = 1000  # dropped_ranges keeps the newest ranges; `dropped` stays exact
# Containers whose header states the presentation length independently of what follows it, so
# reading less than that means the file was cut. Others (MPEG-TS, NUT, raw streams) only have
# lengths FFmpeg estimates from the data actually present, which a cut file cannot contradict.
HEADER_DURATION_FORMATS = ("mov", "matroska", "asf")


class Frame(NamedTuple):
    index: int  # counts every frame the source produced, dropped ones included
    timestamp: float  # seconds
    rgb: np.ndarray  # uint8 HxWx3


def natural_key(name: str) -> list:
    """Sort key where runs of digits compare as numbers: 2.jpg < 10.jpg.

    SAM2 sorts frame folders by int(stem); for numeric names this agrees with it, and it still
    gives a stable order for names like frame_2.jpg that int() would reject.
    """
    parts = re.split(r"(\d+)", name)
    return [(0, int(p), p) if p.isdigit() else (1, 0, p.lower()) for p in parts if p != ""]


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


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, OSError)


class _Reading:
    """What one pass over a file saw, for check_complete (all times in seconds)."""

    def __init__(self) -> None:
        self.frames = 0  # frames handed out
        self.exhausted = False  # the demuxer reached its end (or failed): nothing more follows
        self.read_error: str | None = None  # the demuxer failed instead of reaching the end
        self.last_packet_cut = False  # the last packet read was shorter than its index said
        self.decode_errors = 0  # packets the decoder rejected (skipped, as ffmpeg does)
        self.video_end = None  # end of the last video packet, from the stream's start
        self.any_end = None  # end of the last packet of any stream, from the container's start


class VideoSource(FrameSource):
    """Any file PyAV decodes; the first video stream, converted to rgb24.

    Completeness (issue 13). With frame-threaded decoding FFmpeg drops the error of a packet cut
    short by the end of the file, and a file cut at a packet boundary raises nothing at all: a
    truncated faststart or fragmented mp4 used to end quietly. So the check compares what was
    read with what the container declared, after the pass reached the end of the file:
    - the demuxer failed (a read error) or the last packet was shorter than the index said;
    - mov/mp4, Matroska/WebM, ASF: the header's duration (the video stream's own for mp4,
      whose edit lists may hide samples, so sample counts are not compared) is not reached by
      the packets read, by at least HALF_FRAME of a frame interval;
    - AVI: its header's frame count is not reached.
    Containers that declare no length (MPEG-TS, NUT, raw H.264; FLV, whose
    declared duration does not match its frames) cannot tell a cut file from a
    short one; for them only the first rule applies. A file whose moov index was cut away does
    not open at all ("cannot open video"). Decoding errors inside an otherwise complete file
    are skipped like ffmpeg does and counted in `decode_errors`.
    """

    kind = "video"
    HALF_FRAME = 0.5

    def __init__(self, path: Path):
        super().__init__()
        try:
            import av  # noqa: F401
        except ImportError as e:  # pragma: no cover - av is a runtime dependency
            raise InputError(f"reading {path} needs PyAV: pip install av") from e
        self.path = path
        self.name = path.stem
        self._container = None
        self._frames = None
        self._first = None
        self._rec = _Reading()
        self._open()
        stream = self._stream
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else DEFAULT_FOLDER_FPS
        self._declared_end, self.num_frames = self._declared_length()
        # Peeking catches a video with no decodable frame at open rather than mid-run.
        self._first = self._next_frame()
        if self._first is None:
            rec = self._rec
            self.close()
            if rec.read_error:
                raise InputError(f"cannot decode video {path}: {rec.read_error}")
            declared = f" (its container declares {self.num_frames})" if self.num_frames else ""
            raise InputError(f"video {path} has no decodable frames{declared}")
        self.height, self.width = self._first.height, self._first.width

    @property
    def decode_errors(self) -> int:
        return self._rec.decode_errors

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
        self._format = container.format.name
        self._stream = container.streams.video[0]
        # Let FFmpeg use several threads per frame; the output order is unchanged.
        self._stream.thread_type = "AUTO"
        self._rec = _Reading()
        self._frames = self._decode()

    def _declared_length(self) -> tuple[float | None, int | None]:
        """(seconds the header says the video lasts, or None; declared frame count, or None)."""
        st, c = self._stream, self._container
        fmt = c.format.name
        count = int(st.frames) if st.frames and st.frames > 0 else None
        if fmt.startswith("mov"):
            if st.duration:
                end = float(st.duration * st.time_base)
                shown = int(round(end * self.fps))
                # An edit list can show fewer frames than the file has samples: count those.
                if count is None or abs(count - shown) > 1:
                    count = shown
                return end, count
            return None, count
        if fmt.split(",")[0] in HEADER_DURATION_FORMATS and c.duration:
            return c.duration / 1e6, count
        if fmt == "avi" and count:
            return count / self.fps, count
        return None, count

    def _decode(self):
        """Decoded video frames of one pass; keeps _rec up to date for check_complete."""
        import av

        # Bound now: evaluating the except clause must not import anything when the generator
        # is finalised at interpreter exit.
        av_errors = (av.FFmpegError, OSError)
        rec, st, c = self._rec, self._stream, self._container
        video_start = float(st.start_time * st.time_base) if st.start_time is not None else 0.0
        any_start = c.start_time / 1e6 if c.start_time is not None else 0.0
        frame_s = 1.0 / self.fps
        held = None  # a video packet the demuxer flagged corrupt, until we know if it is the last
        try:
            # All streams: a container's duration may be set by its audio, which then must count.
            for packet in c.demux():
                if packet.size:
                    rec.last_packet_cut = packet.is_corrupt
                    t = packet.pts if packet.pts is not None else packet.dts
                    if t is not None:
                        dur = float((packet.duration or 0) * packet.time_base)
                        is_video = packet.stream.index == st.index
                        end = float(t * packet.time_base) + (dur or (frame_s if is_video else 0.0))
                        if is_video and not packet.is_discard:
                            rec.video_end = max(rec.video_end or 0.0, end - video_start)
                        rec.any_end = max(rec.any_end or 0.0, end - any_start)
                if packet.stream.index != st.index:
                    continue
                if held is not None:
                    # Mid-file, a damaged packet is decoded as ffmpeg would (concealment). The
                    # last one is a sample cut short by the end of the file: feeding it to a
                    # frame-threaded decoder would also lose the good frames still in flight.
                    if packet.size:
                        yield from self._decode_packet(held)
                    held = None
                if packet.size and packet.is_corrupt:
                    held = packet
                    continue
                yield from self._decode_packet(packet)
        except av_errors as e:
            rec.read_error = _reason(e)
            yield from self._decode_packet(None)  # the frames the decoder still holds
        rec.exhausted = True

    def _decode_packet(self, packet) -> list:
        """Frames from one packet (None: drain the decoder); [] if the decoder rejects it."""
        try:
            return self._stream.decode(packet)
        except _av_errors():
            self._rec.decode_errors += 1
            return []

    def _next_frame(self):
        if self._frames is None:  # closed while a loop was still iterating
            return None
        try:
            return next(self._frames)
        except StopIteration:
            return None

    def _to_rgb(self, frame) -> np.ndarray:
        # Scaling to the first frame's size keeps every frame the same shape even for the
        # rare stream whose resolution changes mid-way.
        rgb = frame.to_ndarray(format="rgb24", width=self.width, height=self.height)
        return np.ascontiguousarray(rgb, dtype=np.uint8)

    def _timestamp(self, frame, index: int) -> float:
        st = self._stream
        if frame.pts is None:
            return index / self.fps
        return float((frame.pts - (st.start_time or 0)) * st.time_base)

    def frames(self) -> Iterator[Frame]:
        if self._first is None:
            # A second pass: start decoding again from the beginning.
            self.close()
            self._open()
            self._first = self._next_frame()
        index = 0
        frame, self._first = self._first, None
        while frame is not None and not self.stopped:
            self._rec.frames = index + 1
            yield Frame(index, self._timestamp(frame, index), self._to_rgb(frame))
            index += 1
            frame = self._next_frame()

    def check_complete(self) -> None:
        """Raise IncompleteInputError if the pass that just ended stopped short of the file's
        declared end; nothing when it was not read to the end (stopped, --max-frames)."""
        rec = self._rec
        if not rec.exhausted:
            return
        missing = None
        if self._declared_end is not None:
            # mov and AVI declare the video stream's own length; the others the whole file's.
            own = self._format.startswith("mov") or self._format == "avi"
            missing = self._declared_end - ((rec.video_end if own else rec.any_end) or 0.0)
        cut = missing is not None and missing * self.fps > self.HALF_FRAME
        if not (rec.read_error or rec.last_packet_cut or cut):
            return
        n, m = rec.frames, self.num_frames
        if m is not None and m > n:
            where = f"{n} of its {m} frames"
        elif cut:  # a length for the whole file (audio included): say it in seconds
            reached = self._declared_end - missing
            where = f"{n} frames, at {reached:.2f} s of its {self._declared_end:.2f} s"
        else:
            where = f"{n} frames"
        why = f"reading failed: {rec.read_error}" if rec.read_error else "the file is cut short"
        raise IncompleteInputError(f"video {self.path} ended after {where}: {why}")

    def close(self) -> None:
        self._first = None
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        if self._container is not None:
            self._container.close()
            self._container = None


def _reason(e: BaseException) -> str:
    # FFmpeg errors repeat the file name after the message; keep the line short.
    return getattr(e, "strerror", None) or str(e)


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
    from fastsam2.runtime import live

    target = live.live_target(path)
    if target is not None:
        return live.LiveSource(target, fps=fps, realtime=realtime, open_timeout=open_timeout,
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
