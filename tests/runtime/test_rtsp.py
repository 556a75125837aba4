"""RTSP end to end: what an IP camera serves (H.264 over RTP, RTSP over TCP), from a real RTSP
server (GStreamer's rtsp-server, tests/rtsp_server.py) on 127.0.0.1, read by the live source
and tracked by fastsam2-run: every frame in order, --realtime (drops counted), a stall (bounded
by --timeout: one line, complete outputs) and a disconnect (the server killed mid-stream).

The server needs system packages (python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly; scripts/
install.sh installs them). Without them these tests skip on a developer's machine and FAIL in
CI (CI set), so CI cannot pass without exercising RTSP.

Nothing here depends on speed: a test that needs the consumer to be slower than the stream
makes it so by waiting until the source has received more frames (LiveSource.received), and the
disconnect happens at a frame the test chooses.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from fastsam2.runtime import frame_source, live
from fastsam2.runtime.errors import SourceError
from fastsam2.runtime.outputs import read_palette_png
from fastsam2.runtime.run_cli import main
from fastsam2.runtime.video import open_frames
import stream_server
from rtsp_server import gstreamer_missing, serve_rtsp
from stream_server import read_stamp

HANG_S = 60.0  # hang guard per wait; normal runs take seconds
SMALL = (96, 128)  # source-level tests: small frames, cheap to encode on a shared machine
MISSING = gstreamer_missing()
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(autouse=True)
def _gstreamer():
    if MISSING:
        if IN_CI:
            pytest.fail(f"CI must run the RTSP tests, but {MISSING} (scripts/install.sh installs "
                        "the GStreamer packages)")
        pytest.skip(f"no RTSP server here: {MISSING}")


def bounded(fn, seconds: float = HANG_S):
    return stream_server.bounded(fn, seconds)


def wait_until(condition, seconds: float = HANG_S) -> None:
    stream_server.wait_until(condition, seconds)


# ----------------------------------------------------------------------------- the live source


def test_rtsp_in_order_hands_out_every_frame_and_ends_with_the_stream():
    with serve_rtsp(frames=24, size=SMALL, stamp=True) as served:
        def run():
            with open_frames(served.url, open_timeout=10) as src:
                assert (src.kind, src.live, src.num_frames, src.realtime) == ("stream", True, None, False)
                assert (src.width, src.height) == (128, 96) and src.fps == 24.0
                return [(f.index, read_stamp(f.rgb)) for f in src.frames()], src.dropped

        got, dropped = bounded(run)
    # the server ended the stream after its 24 frames (RTCP BYE): the iteration ended by itself
    assert got == [(i, i) for i in range(24)] and dropped == 0


def test_rtsp_realtime_consumer_gets_the_newest_frame_and_counts_the_rest():
    with serve_rtsp(frames=24, size=SMALL, stamp=True) as served:
        def run():
            with open_frames(served.url, realtime=True, open_timeout=10) as src:
                got = []
                for f in src.frames():
                    got.append((f.index, read_stamp(f.rgb)))
                    if f.index < 20:  # a busy consumer: 3 more frames arrive meanwhile
                        wait_until(lambda: src.received >= f.index + 4)
                return got, src.dropped, src.dropped_ranges, src.received

        got, dropped, ranges, received = bounded(run)
    idx = [g[0] for g in got]
    assert [g[1] for g in got] == idx  # the frame handed out is the server's frame of that index
    assert idx == sorted(set(idx)) and idx[-1] == 23 and received == 24
    assert all(b - a >= 3 for a, b in zip(idx, idx[1:]) if a < 20)  # each wait dropped >= 2
    skipped = [i for a, b in ranges for i in range(a, b + 1)]
    assert dropped == len(skipped) > 0 and sorted(idx + skipped) == list(range(24))


def test_rtsp_stream_that_stalls_is_a_source_error_after_its_frames():
    with serve_rtsp(frames=24, size=SMALL, stamp=True, stall_after=10) as served:
        got = []

        def run():
            with open_frames(served.url, open_timeout=10, read_timeout=1.0) as src:
                for f in src.frames():
                    got.append(read_stamp(f.rgb))

        with pytest.raises(SourceError, match="stopped delivering frames") as e:
            bounded(run)
    assert got == list(range(10)) and "\n" not in str(e.value)


def test_rtsp_server_killed_mid_stream_ends_the_stream_after_the_frames_received():
    with serve_rtsp(frames=24, size=SMALL, stamp=True, loop=True) as served:
        def run():
            with open_frames(served.url, open_timeout=10, read_timeout=HANG_S) as src:
                got = []
                for f in src.frames():
                    got.append((f.index, read_stamp(f.rgb)))
                    if f.index == 9:
                        served.kill()
                return got

        got = bounded(run)
    # FFmpeg reads the closed connection as the end of the stream: the frames that were on
    # their way are handed out, then the iteration ends (no error, no hang)
    assert len(got) >= 10 and got == [(i, i) for i in range(len(got))]


def test_rtsp_unknown_path_is_one_line():
    with serve_rtsp(frames=24, size=SMALL) as served:
        url = served.url.replace("/stream", "/nosuch")
        with pytest.raises(SourceError, match="404") as e:
            bounded(lambda: open_frames(url, open_timeout=10))
    assert str(e.value).startswith(f"cannot open stream {url}") and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- fastsam2-run


def run_cli(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        return res.exit_code, res.output + "".join(traceback.format_exception(*res.exc_info))
    return res.exit_code, res.output


def slow_source(monkeypatch, ahead: int = 0, at_frame=None):
    """Make the tracker's live source a consumer `ahead` frames behind the stream (it takes the
    next frame only once the source has received frame index + ahead), and call at_frame(index)
    after each frame was processed. Counted in frames, not seconds."""
    frames = live.LiveSource.frames

    def patched(self):
        for f in frames(self):
            yield f
            if at_frame is not None:
                at_frame(f.index)
            if ahead:
                wait_until(lambda: self.received >= f.index + ahead)

    monkeypatch.setattr(live.LiveSource, "frames", patched)


def xy(p):
    return f"{p[0]:g},{p[1]:g}"


def outputs_of(out):
    res = json.loads((out / "results.json").read_text())
    idx = [f["frame"] for f in res["frames"]]
    masks = sorted(int(p.stem) for p in (out / "masks").iterdir())
    return res, idx, masks


def overlay_frames(out) -> int:
    import av

    with av.open(str(out / "overlay.mp4")) as c:
        return sum(1 for _ in c.decode(video=0))


def test_run_tracks_an_rtsp_stream(bundle_dir, tmp_path):
    out = tmp_path / "r"
    with serve_rtsp(frames=48, loop=True) as served:
        p = served.video.first_frame_points[1]
        code, text = run_cli([served.url, "--bundle", bundle_dir, "--point", xy(p), "--keep", "0.5",
                              "--backend", "ort-cpu", "--max-frames", "6", "--timeout", "30", "--out", out])
        truth = served.video.read_mask(0)
    assert code == 0, text
    res, idx, masks = outputs_of(out)
    assert res["status"] == "finished" and idx == masks == list(range(6))
    assert res["source"] == {**res["source"], "kind": "stream", "live": True, "declared_frames": None,
                             "width": 320, "height": 240}
    assert res["input"] == served.url and res["dropped_frames"] == {"count": 0, "ranges": []}
    m0 = read_palette_png(out / "masks" / "00000.png")
    assert m0.shape == (240, 320) and m0[int(p[1]), int(p[0])] == 1  # the clicked object is tracked
    assert (m0 == 1)[truth == 1].mean() > 0.5  # and it is the object the click was on
    assert overlay_frames(out) == 6


def test_run_rtsp_realtime_counts_the_frames_it_dropped(bundle_dir, tmp_path, monkeypatch):
    slow_source(monkeypatch, ahead=3)  # 2 frames or more arrive while each frame is tracked
    out = tmp_path / "rt"
    with serve_rtsp(frames=48, loop=True) as served:
        p = served.video.first_frame_points[1]
        code, text = run_cli([served.url, "--bundle", bundle_dir, "--point", xy(p), "--keep", "0.5",
                              "--backend", "ort-cpu", "--realtime", "--max-frames", "5", "--timeout", "30",
                              "--out", out])
    assert code == 0, text
    res, idx, masks = outputs_of(out)
    assert len(idx) == 5 and idx == masks == sorted(set(idx))
    lost = [i for a, b in res["dropped_frames"]["ranges"] for i in range(a, b + 1)]
    assert res["dropped_frames"]["count"] == len(lost) >= 2 * 4
    # every frame the source produced up to the last one tracked was tracked or dropped, once
    assert sorted(idx + [i for i in lost if i < idx[-1]]) == list(range(idx[-1] + 1))
    assert "dropped" in text.strip().splitlines()[-1]
    assert overlay_frames(out) == 5


def test_run_rtsp_stall_is_one_line_and_keeps_complete_outputs(bundle_dir, tmp_path):
    out = tmp_path / "stall"
    with serve_rtsp(frames=24, stall_after=8) as served:
        code, text = run_cli([served.url, "--bundle", bundle_dir, "--point", "100,100", "--keep", "0.5",
                              "--backend", "ort-cpu", "--timeout", "5", "--out", out, "--quiet"])
    assert code == 2 and "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "stopped delivering frames" in errors[0], text
    res, idx, masks = outputs_of(out)
    assert res["status"] == "failed" and res["error"] in errors[0]
    assert idx == masks == list(range(8)) and overlay_frames(out) == 8  # every frame sent, in order


def test_run_rtsp_server_killed_mid_stream_keeps_complete_outputs(bundle_dir, tmp_path, monkeypatch):
    # --realtime: the frames already on their way when the server dies are not all tracked
    # (in order, a slow tracker would work through every frame the network buffered)
    out, handed = tmp_path / "gone", []
    with serve_rtsp(frames=48, loop=True) as served:
        def kill_at_the_third(index):
            handed.append(index)
            if len(handed) == 3:
                served.kill()

        slow_source(monkeypatch, at_frame=kill_at_the_third)
        code, text = run_cli([served.url, "--bundle", bundle_dir, "--point", "100,100", "--keep", "0.5",
                              "--backend", "ort-cpu", "--realtime", "--timeout", "30", "--out", out, "--quiet"])
    assert code == 0 and "Traceback" not in text, text
    res, idx, masks = outputs_of(out)
    # the stream ended with the server: every frame handed out was tracked, and recorded
    assert res["status"] == "finished" and "error" not in res
    assert len(idx) >= 3 and idx == masks == handed and idx == sorted(set(idx))
    lost = [i for a, b in res["dropped_frames"]["ranges"] for i in range(a, b + 1)]
    assert res["dropped_frames"]["count"] == len(lost) and not set(lost) & set(idx)
    assert overlay_frames(out) == len(idx)


def test_run_rtsp_frame_over_the_maximum_side_is_one_line(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(frame_source, "MAX_INPUT_SIDE", 300)  # the stream is 320x240
    out = tmp_path / "big"
    with serve_rtsp(frames=24, loop=True) as served:
        code, text = run_cli([served.url, "--bundle", bundle_dir, "--point", "100,100", "--backend", "ort-cpu",
                              "--timeout", "30", "--out", out, "--quiet"])
    assert code == 2 and text.strip().splitlines() == [
        f"error: stream {served.url} is 320x240: over the 300 px maximum side; "
        "downscale it first (e.g. ffmpeg -vf scale=-2:300)"], text
    assert not (out / "results.json").exists()
