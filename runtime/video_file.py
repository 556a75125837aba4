"""A video file read with PyAV (VideoSource): every frame of its first video stream, in order,
and whether the file was complete (check_complete). The FrameSource contract is in
fastsam2.runtime.video; open_frames picks this source for anything that is not a folder, a
camera or a URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import IncompleteInputError, InputError
from .frame_source import DEFAULT_FOLDER_FPS, Frame, FrameSource, check_input_size

# Containers whose header states the presentation length independently of what follows it, so
# reading less than that means the file was cut. Others (MPEG-TS, NUT, raw streams) only have
# lengths FFmpeg estimates from the data actually present, which a cut file cannot contradict.
HEADER_DURATION_FORMATS = ("mov", "matroska", "asf")


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
        cc = self._stream.codec_context
        if cc.width and cc.height:  # what the stream declares: refused before a frame is decoded
            self._refuse_if_too_large(cc.width, cc.height)
        # Peeking catches a video with no decodable frame at open rather than mid-run.
        self._first = self._next_frame()
        if self._first is None:
            rec = self._rec
            self.close()
            if rec.read_error:
                raise InputError(f"cannot decode video {path}: {rec.read_error}")
            declared = f" (its container declares {self.num_frames})" if self.num_frames else ""
            raise InputError(f"video {path} has no decodable frames{declared}")
        self._refuse_if_too_large(self._first.width, self._first.height)
        self.height, self.width = self._first.height, self._first.width

    def _refuse_if_too_large(self, width: int, height: int) -> None:
        try:
            check_input_size(width, height, f"video {self.path}")
        except InputError:
            self.close()
            raise

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
