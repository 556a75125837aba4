"""Live frame sources: a camera (V4L2) or a network stream, read by PyAV on a reader thread.

    open_frames("/dev/video0")                                  # kind "camera"
    open_frames("rtsp://user:pw@cam.local/stream1")             # kind "stream"
    open_frames("http://127.0.0.1:8080/live.ts", realtime=True)

What is live: see fastsam2.runtime.live_target (live_target, and the FFmpeg options per
scheme). A URL whose container declares a length (an mp4 or an HLS VOD playlist over HTTP) is
read like a file: live=False, num_frames declared, every frame in order, realtime ignored.
Everything else is live: no end, num_frames None.

Size: the first frame's size is the working size; one over MAX_INPUT_SIDE is refused
(SourceError; fastsam2.runtime.frame_source). Later frames of another size (a stream that
changes resolution) are scaled to the working size as they are converted, one at a time.

Reading. A background thread owns the PyAV container: it opens it, decodes continuously and
passes frames on; frames() never calls into FFmpeg. Two policies:
- in order (realtime=False): every frame is handed out, in order. The thread stops reading
  while QUEUE_FRAMES decoded frames wait, so the network buffers the rest (TCP, HTTP, RTSP over
  TCP lose nothing). UDP and camera drivers buffer little: a consumer far behind loses frames
  there, before they reach us, and those cannot be counted.
- realtime=True: the thread decodes every frame (inter-frame codecs need them all) and keeps
  only the newest. frames() hands that one out when the consumer asks for the next; the frames
  that arrived while the consumer was busy count as dropped (dropped, dropped_ranges). A frame
  that arrives but is never asked for (the source is stopped first) is not counted.
Frame.index counts every frame decoded, so handed-out indices plus dropped ranges cover
0..last without gaps; `received` counts the frames decoded so far (handed out, dropped or
waiting), so a caller can compare it with what it was handed. Frame.timestamp is from the
stream's pts relative to the first frame; for streams without timestamps (MJPEG over HTTP) it
is the arrival time relative to the first frame.

Time bounds: open_timeout bounds the time to the first decoded frame (connect, probe, decode;
the constructor gives up OPEN_GRACE_S after it at the latest, even where FFmpeg cannot be
interrupted, e.g. a hanging name lookup); read_timeout the silence between frames; both give
SourceError (one line; FFmpeg's own log is silenced). A stream the server ends (EOF, or the
server closing the connection) ends the iteration normally; for RTSP that includes a server
that goes away mid-stream (FFmpeg reports its closed connection as the end of the stream, as
it does an RTCP BYE). UDP has no end: a sender that stops reads as a silent stream
(SourceError after read_timeout).

Stopping: stop() (thread-safe) makes frames() return at once; the reader thread ends when its
current read returns (the next frame, or read_timeout on a silent stream) and closes the
container itself. close(), the end of a with-block and garbage collection of the source do the
same, also when the consumer raised.

FFmpeg reads PROBE_SECONDS of a stream before the first frame is out, and MPEG-TS/H.264 holds
the newest frame until the next one starts, so a TS stream is ~2 frames behind the sender.
"""

from __future__ import annotations

import errno
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import SourceError
from .frame_source import DEFAULT_FOLDER_FPS, DropRecord, Frame, FrameSource, check_input_size
# what is live and how FFmpeg opens it; re-exported for callers of this module
from .live_target import PROBE_SECONDS, LiveTarget, check_host, ffmpeg_options, live_target  # noqa: F401

QUEUE_FRAMES = 2  # decoded frames waiting in order: the decode of the next overlaps the consumer
OPEN_GRACE_S = 2.0  # on top of open_timeout: FFmpeg's own timeout should fire first
WATCHDOG_GRACE_S = 5.0  # on top of read_timeout, for a reader stuck where FFmpeg cannot time out
MAX_TIMEOUT_S = 3600.0  # open/read timeouts: an hour of silence is a dead source
MAX_FPS = 1000.0  # what a camera may be asked for
CLOSE_JOIN_S = 1.0  # close() waits this long for the reader; it finishes on its own after
AVFMT_NOTIMESTAMPS = 0x80
# Protocols that end by closing the connection: there, an I/O error after the first frame is
# the server hanging up (FFmpeg's http reader reports a close without a final chunk as EIO).
CLOSING_SCHEMES = ("http", "https", "tcp", "rtmp", "rtmps", "rtmpt", "rtmpts")


class _Reader:
    """State shared by the source and its reader thread; holds no reference to the source, so
    dropping the source lets it be collected (which stops the thread)."""

    def __init__(self, target: LiveTarget, options: dict, realtime: bool, fps: float | None,
                 open_timeout: float, read_timeout: float, stop_event: threading.Event):
        self.target, self.options, self.realtime, self.fps = target, options, realtime, fps
        self.open_timeout, self.read_timeout = open_timeout, read_timeout
        self.stop = stop_event
        self.cond = threading.Condition()
        self.items: deque = deque()  # (index, timestamp, rgb or av.VideoFrame)
        self.drops = DropRecord()
        self.ready = threading.Event()  # the first frame is decoded (or the reader gave up)
        self.info: dict | None = None
        self.ended = False  # nothing more will come
        self.error: BaseException | None = None
        self.decode_errors = 0
        self.received = 0  # frames decoded so far: handed out, dropped or waiting

    # --- reader side
    def put(self, index: int, timestamp: float, payload) -> None:
        with self.cond:
            if self.realtime:
                if self.items:  # the consumer did not ask for it before this one arrived
                    self.drops.add(self.items.pop()[0])
            else:
                while len(self.items) >= QUEUE_FRAMES and not self.stop.is_set():
                    self.cond.wait(0.5)
            self.items.append((index, timestamp, payload))
            self.received = index + 1
            self.cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            if error is not None and self.error is None:
                self.error = error
            self.ended = True
            self.cond.notify_all()
        self.ready.set()

    # --- consumer side
    def take(self):
        """The next item, or None at the end or after stop; raises the reader's error."""
        waited_since = time.monotonic()
        with self.cond:
            while True:
                if self.stop.is_set():
                    return None
                if self.items:
                    item = self.items.popleft()
                    self.cond.notify_all()
                    return item
                if self.error is not None:
                    raise self.error
                if self.ended:
                    return None
                if time.monotonic() - waited_since > self.read_timeout + WATCHDOG_GRACE_S:
                    raise SourceError(f"{self.target.display} stopped delivering frames "
                                      f"(nothing for {self.read_timeout:g} s)")
                self.cond.wait(0.25)

    def shutdown(self) -> None:
        self.stop.set()
        with self.cond:
            self.items.clear()
            self.cond.notify_all()


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _open_error(r: _Reader, e: BaseException) -> SourceError:
    import av

    t, what = r.target, r.target.kind
    if isinstance(e, av.ExitError):
        why = f"no answer within {r.open_timeout:g} s"
    elif isinstance(e, av.ProtocolNotFoundError):
        why = f"this FFmpeg build cannot read {t.scheme}:// URLs"
    elif isinstance(e, FileNotFoundError) and t.kind == "camera":
        why = "no such device"
    elif isinstance(e, av.InvalidDataError) and t.kind == "stream":
        why = "the server sent nothing FFmpeg can read as video"
    else:
        why = _reason(e)
    return SourceError(f"cannot open {what} {t.display}: {why}")


def _read_error(r: _Reader, e: BaseException, silent_s: float) -> SourceError | None:
    """SourceError for an error after the first frame, or None when it means a normal end."""
    import av

    t = r.target
    if isinstance(e, EOFError):
        return None
    if isinstance(e, av.ExitError) or (isinstance(e, OSError) and e.errno == errno.ETIMEDOUT):
        # PyAV's interrupt (ExitError) or FFmpeg's own rw_timeout (ETIMEDOUT), whichever fires
        # first. The silence is measured: a stream that went quiet while FFmpeg was still
        # probing it hit the open timeout there, and reports it when the probed frames are out.
        return SourceError(f"{t.display} stopped delivering frames (nothing for {silent_s:.1f} s)")
    if isinstance(e, OSError) and e.errno == errno.EIO and t.scheme in CLOSING_SCHEMES:
        return None
    if t.kind == "camera" and isinstance(e, OSError) and e.errno in (errno.ENODEV, errno.EIO):
        return SourceError(f"camera {t.display} went away: {_reason(e)}")
    return SourceError(f"{t.display} failed: {_reason(e)}")


def _run(r: _Reader) -> None:
    """The reader thread: open, decode, hand on; always closes the container."""
    import av

    container = None
    try:
        check_host(r.target)
        try:
            container = av.open(r.target.url, "r", format=r.target.format, options=r.options,
                                timeout=(r.open_timeout, r.read_timeout))
        except (av.FFmpegError, OSError) as e:
            raise _open_error(r, e) from None
        if r.stop.is_set():
            return
        if not container.streams.video:
            raise SourceError(f"{r.target.display} has no video stream")
        st = container.streams.video[0]
        # Slice threads only: frame threads hold back one frame per thread, latency a live
        # source should not have.
        st.thread_type = "SLICE"
        no_timestamps = bool(container.format.flags & AVFMT_NOTIMESTAMPS)
        index, first_pts, first_arrival = 0, None, None
        try:
            for packet in container.demux(st):
                if r.stop.is_set():
                    return
                try:
                    decoded = packet.decode()
                except av.FFmpegError:
                    r.decode_errors += 1  # a damaged packet (UDP loss): skip it like ffmpeg does
                    continue
                for f in decoded:
                    now = last_arrival = time.monotonic()
                    if index == 0:
                        first_pts, first_arrival = f.pts, now
                        # the working size for the whole run: bounded before anything uses it
                        check_input_size(f.width, f.height, f"{r.target.kind} {r.target.display}",
                                         SourceError)
                        r.info = _stream_info(r, container, st, f)
                        # A finished file over HTTP is read like a file: every frame, in order.
                        r.realtime = r.realtime and r.info["live"]
                    if no_timestamps or f.pts is None or first_pts is None:
                        ts = now - first_arrival
                    else:
                        ts = float((f.pts - first_pts) * st.time_base)
                    # In order, convert here so it overlaps the consumer; realtime converts only
                    # the frames it hands out (in the consumer).
                    payload = f if r.realtime else _to_rgb(f, r.info)
                    r.put(index, ts, payload)
                    if index == 0:
                        r.ready.set()
                    index += 1
                    if r.stop.is_set():
                        return
        except (av.FFmpegError, OSError, EOFError) as e:
            if index == 0:
                raise _open_error(r, e) from None
            err = _read_error(r, e, time.monotonic() - last_arrival)
            if err is not None:
                raise err from None
        if index == 0:
            raise SourceError(f"{r.target.display} ended before its first frame")
    except BaseException as e:  # handed to the consumer, which raises it
        r.finish(e)
    finally:
        if container is not None:
            container.close()
        r.finish()


def _stream_info(r: _Reader, container, st, first) -> dict:
    no_timestamps = bool(container.format.flags & AVFMT_NOTIMESTAMPS)
    rate = r.fps or st.average_rate or (None if no_timestamps else st.guessed_rate)
    fps = float(rate) if rate else DEFAULT_FOLDER_FPS
    # Only HTTP serves finished files as fast as they are read; RTSP, RTMP, UDP, TCP senders
    # pace frames at their rate even when they play a file, so those stay live.
    declared = bool(container.duration and container.duration > 0
                    and r.target.scheme in ("http", "https"))
    num_frames = None
    if declared:  # a finished file served over the network: read it like a file
        num_frames = int(st.frames) if st.frames else int(round(container.duration / 1e6 * fps))
    return {"width": first.width, "height": first.height, "fps": fps, "live": not declared,
            "num_frames": num_frames}


def _to_rgb(frame, info: dict) -> np.ndarray:
    # The first frame's size for every frame, as for files (a stream may change resolution).
    rgb = frame.to_ndarray(format="rgb24", width=info["width"], height=info["height"])
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _silence_ffmpeg() -> None:
    import av.logging

    # PyAV starts silent; make sure nothing (e.g. an earlier set_level) prints FFmpeg's noise
    # unless someone asked for a level on purpose.
    if av.logging.get_level() is None:
        av.logging.set_level(None)


class LiveSource(FrameSource):
    """A camera or network stream; see the module docstring."""

    def __init__(self, target: LiveTarget, fps: float | None = None, realtime: bool = False,
                 open_timeout: float = 10.0, read_timeout: float | None = None):
        super().__init__()
        import av  # noqa: F401  (fail here, not in the thread, if PyAV is missing)

        read_timeout = open_timeout if read_timeout is None else read_timeout
        for what, seconds in (("open", open_timeout), ("read", read_timeout)):
            # NaN fails the comparison too; over the bound, FFmpeg's microsecond options and the
            # thread waits overflow (inf, 1e12)
            if not 0 < seconds <= MAX_TIMEOUT_S:
                raise SourceError(f"{what} timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                                  f"got {seconds}")
        if fps is not None and not 0 < fps <= MAX_FPS:
            raise SourceError(f"fps must be in (0, {MAX_FPS:g}], got {fps}")
        self.target = target
        self.kind = target.kind
        self.name = target.name
        self.url = target.display
        if target.kind == "camera" and not Path(target.url).exists():
            raise SourceError(f"no camera at {target.display} (no such device)")
        _silence_ffmpeg()
        r = self._reader = _Reader(target, ffmpeg_options(target, fps, read_timeout), realtime, fps,
                                   open_timeout, read_timeout, self._stop_event)
        self._drops, self._drops_lock = r.drops, r.cond
        self._thread = threading.Thread(target=_run, args=(r,), daemon=True,
                                        name=f"fastsam2-reader {target.display}")
        self._finalizer = weakref.finalize(self, _Reader.shutdown, r)
        self._thread.start()
        if not r.ready.wait(open_timeout + OPEN_GRACE_S):
            self.close()
            raise SourceError(f"cannot open {target.kind} {target.display}: "
                              f"no frame within {open_timeout:g} s")
        if r.info is None:  # the reader gave up before the first frame
            error = r.error
            self.close()
            raise error if error is not None else SourceError(
                f"{target.display} ended before its first frame")
        self.width, self.height = r.info["width"], r.info["height"]
        self.fps = r.info["fps"]
        self.live = r.info["live"]
        self.num_frames = r.info["num_frames"]
        self.realtime = r.realtime

    @property
    def decode_errors(self) -> int:
        """Packets the decoder rejected and skipped (damaged data, e.g. UDP loss)."""
        return self._reader.decode_errors

    @property
    def received(self) -> int:
        """Frames decoded so far: handed out, dropped (realtime) or waiting to be handed out."""
        with self._reader.cond:
            return self._reader.received

    def frames(self) -> Iterator[Frame]:
        r = self._reader
        while True:
            item = r.take()
            if item is None:
                return
            index, timestamp, payload = item
            rgb = payload if isinstance(payload, np.ndarray) else _to_rgb(payload, r.info)
            yield Frame(index, timestamp, rgb)

    def stop(self) -> None:
        self._stop_event.set()
        r = self._reader
        with r.cond:  # an RLock: safe from a signal handler that interrupted take()
            r.cond.notify_all()

    def close(self) -> None:
        self._finalizer()  # stop the reader and drop queued frames (once)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_JOIN_S)

    def __repr__(self) -> str:
        mode = "realtime" if getattr(self, "realtime", False) else "in order"
        return f"<LiveSource {self.kind} {self.url!r} {self.width}x{self.height} {mode}>"
