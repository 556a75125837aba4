"""Cameras and network streams (fastsam2.runtime.live) read from localhost streams a subprocess
serves at real time (tests/stream_server.py), never an outside address.

The server stamps its frame counter into every frame (stream_server.stamp), so a test knows
exactly which frames it was handed. Every test is bounded by its own deadline (no
pytest-timeout here); the deadlines are hang guards, far above the time the test needs.
Nothing here depends on speed: where a test asserts what was dropped or where a reader joined,
the server sends frames when the test says (serve_stream(gate=True)) and the test waits for
the reader to have them (LiveSource.received), instead of sleeping.
"""

from __future__ import annotations

import contextlib
import gc
import http.server
import os
import socket
import threading
import time

import av
import numpy as np
import pytest

from fastsam2.runtime import frame_source
from fastsam2.runtime.errors import SourceError
from fastsam2.runtime.video import Frame, open_frames
import stream_server
from stream_server import read_stamp, serve_stream

FPS = 24.0
SIZE = (96, 128)  # small frames: the server renders and encodes them on a shared 2-core machine
HANG_S = 30.0  # a test that has not finished by then is hung; normal runs take ~1-4 s


@pytest.fixture(scope="module")
def stream():
    """stream(kind, **serve_stream options) -> a server shared by the tests of this module.

    Each TCP/HTTP connection gets the clip from its frame 0, so tests can share a server;
    starting one costs ~1 s on the shared test machine."""
    with contextlib.ExitStack() as stack:
        servers = {}

        def get(kind, **kw):
            key = (kind, tuple(sorted(kw.items())))
            if key not in servers:
                servers[key] = stack.enter_context(
                    serve_stream(kind, fps=FPS, size=SIZE, stamp=True, **{"frames": 24, **kw}))
            return servers[key]

        yield get


def bounded(fn, seconds: float = HANG_S):
    return stream_server.bounded(fn, seconds)


def read_all(src, per_frame_s: float = 0.0, limit: int | None = None) -> list[tuple[int, int, float]]:
    """(index, stamp, timestamp) of every frame handed out; sleeps per frame (a slow consumer)."""
    got = []
    for f in src.frames():
        assert isinstance(f, Frame)
        assert f.rgb.dtype == np.uint8 and f.rgb.shape == (src.height, src.width, 3)
        got.append((f.index, read_stamp(f.rgb), f.timestamp))
        if limit is not None and len(got) >= limit:
            break
        time.sleep(per_frame_s)
    return got


def wait_until(condition, seconds: float = HANG_S) -> None:
    stream_server.wait_until(condition, seconds)


def refused_port():
    """A bound TCP port nobody listens on: connecting is refused, and no other process can
    take the port while the socket is held."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


@pytest.mark.parametrize("kind", ["http", "tcp", "mjpeg"])
def test_in_order_hands_out_every_frame(stream, kind):
    served = stream(kind)

    def run():
        with open_frames(served.url, open_timeout=10) as src:
            assert (src.kind, src.live, src.num_frames) == ("stream", True, None)
            assert (src.width, src.height) == (128, 96) and src.fps == FPS
            # 1.5 frame intervals per frame: slower than the stream, so only the network
            # buffering keeps every frame
            return read_all(src, per_frame_s=1.5 / FPS), src.dropped, src.dropped_ranges

    got, dropped, ranges = bounded(run)
    # the server closed the stream after its 24 frames: the iteration ended by itself
    assert [g[0] for g in got] == list(range(24))
    assert [g[1] for g in got] == list(range(24))  # frame i is the server's i-th frame
    assert dropped == 0 and ranges == []
    ts = np.array([g[2] for g in got])
    assert ts[0] == 0.0 and np.all(np.diff(ts) > 0)
    if kind != "mjpeg":  # MPEG-TS carries pts: exactly i / fps (MJPEG: arrival times)
        assert np.allclose(ts, np.arange(24) / FPS, atol=1e-3)


def test_realtime_hands_out_the_newest_and_counts_the_frames_that_came_meanwhile():
    # The test is the clock: after each frame it takes, it lets the server send 5 more and
    # waits until the reader has decoded them (MJPEG: a frame is out as soon as it arrives).
    # Four of them arrived while the consumer was busy: dropped; the fifth is handed out.
    with serve_stream("mjpeg", fps=FPS, frames=24, size=SIZE, stamp=True, gate=True) as served:
        served.release(1)

        def run():
            with open_frames(served.url, realtime=True, open_timeout=10) as src:
                assert src.realtime
                got, frames, sent = [], src.frames(), 1
                for f in frames:
                    got.append((f.index, read_stamp(f.rgb)))
                    if sent == 24:
                        continue
                    sent = min(24, sent + 5)
                    served.release(sent)
                    wait_until(lambda: src.received == sent)
                return got, src.dropped, src.dropped_ranges, src.received

        got, dropped, ranges, received = bounded(run)
    assert [g[1] for g in got] == [g[0] for g in got]  # index i is the server's i-th frame
    assert [g[0] for g in got] == [0, 5, 10, 15, 20, 23]
    assert ranges == [[1, 4], [6, 9], [11, 14], [16, 19], [21, 22]] and dropped == 18
    assert received == 24  # handed out and dropped together are every frame the server sent


def test_realtime_consumer_behind_a_whole_ts_stream_gets_its_last_frame():
    # All 24 frames are out before the consumer asks for its second: whatever it got first,
    # the next is the last, and every frame in between is counted as dropped.
    with serve_stream("http", fps=FPS, frames=24, size=SIZE, stamp=True, gate=True) as served:
        served.release(24)

        def run():
            with open_frames(served.url, realtime=True, open_timeout=10) as src:
                frames = src.frames()
                first = next(frames)
                wait_until(lambda: src.received == 24)
                got = [first] + list(frames)
                return [(f.index, read_stamp(f.rgb)) for f in got], src.dropped, src.dropped_ranges

        got, dropped, ranges = bounded(run)
    idx = [g[0] for g in got]
    assert [g[1] for g in got] == idx and idx[-1] == 23 and len(idx) <= 2
    skipped = [i for a, b in ranges for i in range(a, b + 1)]
    assert dropped == len(skipped) == 24 - len(idx) and sorted(idx + skipped) == list(range(24))


def test_udp_reader_joins_mid_stream_in_order():
    with serve_stream("udp", fps=FPS, frames=24, size=SIZE, stamp=True, loop=True, gate=True) as served:
        served.release(30)  # frames 0..29 (keyframes 0 and 24) go out before anyone listens
        served.wait_sent(30)
        served.play()  # the rest at the stream's rate

        def run():
            with open_frames(served.url, open_timeout=10) as src:
                return read_all(src, limit=30), src.dropped

        got, dropped = bounded(run)
    stamps = [g[1] for g in got]
    # UDP has no connection: the reader starts at the sender's next keyframe (one per second),
    # and from there on gets every frame in order; its indices count from its first frame.
    assert stamps[0] % 24 == 0 and stamps[0] >= 48
    assert stamps == list(range(stamps[0], stamps[0] + 30))
    assert [g[0] for g in got] == list(range(30)) and dropped == 0


def test_stop_from_another_thread_ends_the_wait_on_a_silent_stream(stream):
    # The stream goes quiet after 24 frames (1 s, past FFmpeg's probing); the consumer is then
    # blocked waiting for the next. stop() (what Ctrl-C or --duration call) must end the
    # iteration normally, not when the read timeout (far beyond the deadline) turns the
    # silence into an error.
    served = stream("http", frames=48, stall_after=24)
    src = bounded(lambda: open_frames(served.url, open_timeout=3 * HANG_S,
                                      read_timeout=3 * HANG_S))
    taken = [0]

    def consume():
        for _ in src.frames():
            taken[0] += 1
        return taken[0]

    def stop_when_blocked():
        # the consumer has every frame the reader decoded, past the probing: it waits
        wait_until(lambda: taken[0] >= 20 and taken[0] == src.received)
        src.stop()

    threading.Thread(target=stop_when_blocked, daemon=True).start()
    n = bounded(consume)
    # MPEG-TS/H.264 holds the newest 2 frames until the next arrives (a PES ends where the
    # next one starts), so the consumer saw 22 of the 24 when the stream went quiet.
    assert 20 <= n <= 24
    assert list(src.frames()) == []  # stop is sticky
    src.close()


def test_stop_inside_the_loop_hands_out_no_further_frame(stream):
    served = stream("http", loop=True)

    def run():
        with open_frames(served.url, open_timeout=10) as src:
            got = []
            for f in src.frames():
                got.append(f.index)
                if len(got) == 5:
                    wait_until(lambda: src.received >= 7)  # frames wait; stop() discards them
                    src.stop()
            return got

    assert bounded(run) == [0, 1, 2, 3, 4]


def test_reader_stops_when_the_consumer_raises_or_drops_the_source(stream):
    served = stream("http", loop=True)

    def raise_inside():
        with open_frames(served.url, open_timeout=10) as src:
            thread = src._thread
            try:
                for _ in src.frames():
                    raise KeyError("consumer bug")
            except KeyError:
                pass
        return thread

    thread = bounded(raise_inside)
    thread.join(HANG_S)
    assert not thread.is_alive()

    def drop():
        src = open_frames(served.url, realtime=True, open_timeout=10)
        next(iter(src.frames()))
        return src._thread

    thread = bounded(drop)  # the source is garbage once drop() returns
    gc.collect()
    thread.join(HANG_S)
    assert not thread.is_alive()


@pytest.mark.parametrize("scheme", ["http", "tcp", "rtsp"])
def test_refused_connection_is_a_source_error(scheme):
    sock, port = refused_port()
    with sock:
        url = f"{scheme}://user:secret@127.0.0.1:{port}/cam" if scheme == "rtsp" else \
            f"{scheme}://127.0.0.1:{port}/live"
        with pytest.raises(SourceError, match="cannot open stream .*refused") as e:
            bounded(lambda: open_frames(url, open_timeout=5))
    assert "secret" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("timeouts", [{"open_timeout": float("inf")}, {"open_timeout": 1e12},
                                      {"open_timeout": float("nan")}, {"open_timeout": 0},
                                      {"open_timeout": 5, "read_timeout": -1}])
def test_timeouts_out_of_range_are_one_line(timeouts):
    # inf and 1e12 overflowed FFmpeg's microsecond options / the thread waits (a traceback)
    with pytest.raises(SourceError, match=r"timeout must be a number of seconds in \(0, 3600\], got") as e:
        open_frames("http://127.0.0.1:9/live.ts", **timeouts)
    assert "\n" not in str(e.value)


def test_silent_server_times_out():
    with socket.socket() as srv:  # accepts connections, never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/live.ts"
        with pytest.raises(SourceError, match="no answer within 1 s"):
            bounded(lambda: open_frames(url, open_timeout=1.0))


def test_stream_that_stops_delivering_is_a_source_error_after_its_frames(stream):
    # stall after 1 s of stream: FFmpeg has finished probing (live.PROBE_SECONDS) by then
    served = stream("http", frames=48, stall_after=24)
    got = []

    def run():
        with open_frames(served.url, open_timeout=10, read_timeout=1.0) as src:
            for f in src.frames():
                got.append(read_stamp(f.rgb))

    with pytest.raises(SourceError, match="stopped delivering frames"):
        bounded(run)
    assert got == list(range(24))


@pytest.mark.parametrize("url, match", [
    ("srt://127.0.0.1:9/x", "cannot read srt://"),
    ("http://no-such-host.invalid/live.ts", "unknown host no-such-host.invalid"),
])
def test_unusable_urls(url, match):
    with pytest.raises(SourceError, match=match):
        bounded(lambda: open_frames(url, open_timeout=2))


@pytest.mark.parametrize("path, match", [
    ("/dev/video97", "no camera at /dev/video97"),
    ("97", "no camera at /dev/video97"),  # a bare number, as OpenCV users type it
    ("/dev/null", "cannot open camera /dev/null"),  # a device that is not a V4L2 camera
])
def test_missing_or_unusable_camera(path, match):
    if path != "/dev/null" and os.path.exists("/dev/video97"):
        pytest.skip("this machine has a /dev/video97")
    with pytest.raises(SourceError, match=match):
        bounded(lambda: open_frames(path, open_timeout=2))


def test_finished_file_over_http_is_read_like_a_file(tmp_path):
    # An mp4 behind a plain web server declares its length: not live, every frame in order
    # even with realtime=True (reading it as fast as possible would otherwise drop nearly all).
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        def run():
            with open_frames(f"http://127.0.0.1:{httpd.server_port}/clip.mp4", realtime=True) as src:
                return src.live, src.realtime, src.num_frames, [f.index for f in src.frames()], src.dropped

        live, realtime, n, idx, dropped = bounded(run)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (live, realtime, n, dropped) == (False, False, 12, 0)
    assert idx == list(range(12))


# --------------------------------------------------------------------- the size of live frames


def test_live_first_frame_over_the_maximum_side_is_refused(stream, monkeypatch):
    monkeypatch.setattr(frame_source, "MAX_INPUT_SIDE", 100)  # the stream's frames are 128x96
    served = stream("mjpeg")
    with pytest.raises(SourceError) as e:
        bounded(lambda: open_frames(served.url, open_timeout=10))
    assert str(e.value).startswith(f"stream {served.url} is 128x96: over the 100 px maximum side")
    assert "\n" not in str(e.value)


def test_live_frames_of_another_size_are_scaled_to_the_first(tmp_path, monkeypatch):
    # The first frame sets the working size; a later frame over the maximum (patched down so
    # the test allocates nothing big) or under it is scaled to it, one frame at a time.
    monkeypatch.setattr(frame_source, "MAX_INPUT_SIDE", 200)
    from PIL import Image

    sizes = [(96, 128), (240, 320), (48, 64), (96, 128)]
    greys = [40, 120, 200, 80]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, ((h, w), g) in enumerate(zip(sizes, greys)):
        Image.fromarray(np.full((h, w, 3), g, np.uint8)).save(folder / f"{i:05d}.png")
    with serve_stream("mjpeg", fps=FPS, source=folder) as served:
        def run():
            with open_frames(served.url, open_timeout=10) as src:
                return (src.width, src.height), [f.rgb for f in src.frames()]

        size, frames = bounded(run)
    assert size == (128, 96) and len(frames) == 4
    assert all(f.shape == (96, 128, 3) for f in frames)
    assert np.allclose([f.mean() for f in frames], greys, atol=3)
