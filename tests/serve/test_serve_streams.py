"""Streams on one real Triton server (module-wide, --max-sessions 2): concurrent streams give
exactly their local runs, a stream over the limit is refused, and the client runs with
onnxruntime blocked. (The idle timeout is tested in test_serve_lifecycle.py.)"""

from __future__ import annotations

import contextlib
import json
import threading

import numpy as np
import pytest

from fastsam2.runtime.outputs import read_palette_png
from fastsam2.runtime.session import PromptSpec
from serve_helpers import SERVE_MARK, metrics, run_cli, running_server, serve_videos, wait_for  # noqa: F401

pytestmark = SERVE_MARK
# Triton's "oldest" sequence batcher counts a stream idle from its last request's arrival, so a
# frame queued behind the other stream's frame counts: here (2 cores shared, ~3 s a frame) 3 s
# freed a live stream; 60 s is the server's default
IDLE_S = 60.0
TIMING = ("latency_ms", "frame_ms")  # per-frame fields that measure time, not results


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    with running_server(bundle_dir, tmp_path_factory.mktemp("repo") / "repo", max_sessions=2,
                        idle_timeout=IDLE_S) as s:
        yield s


def schedules(videos):
    """Stream 0: two objects clicked on frame 0. Stream 1: a text + click object, a second object
    prompted on frame 2 (travels with its frame) and the first removed on frame 3."""
    v0, v1 = videos
    return [
        ([(0, 1, PromptSpec(points=[v0.first_frame_points[1]])), (0, 2, PromptSpec(points=[v0.first_frame_points[2]]))], ()),
        ([(0, 1, PromptSpec(text="red ball", points=[v1.first_frame_points[1]])),
          (2, 2, PromptSpec(points=[v1.first_frame_points[2]]))], [(3, 1)]),
    ]


def comparable(results: dict) -> dict:
    frames = [{k: v for k, v in f.items() if k not in TIMING} for f in results["frames"]]
    top = {k: v for k, v in results.items() if k not in ("frames", "totals", "bundle")}
    return {"frames": frames, **top}


def test_concurrent_streams_give_their_local_runs(server, bundle_dir, serve_videos, tmp_path):
    from fastsam2.runtime.track import track
    from fastsam2.serve.client import RemoteModel

    plans = schedules(serve_videos)
    local = []
    for i, (video, (sched, removals)) in enumerate(zip(serve_videos, plans)):
        out = tmp_path / f"local{i}"
        local.append(track(video.frames_dir_or_file, bundle_dir, sched, out, backend="ort-cpu", overlay=False,
                           removals=removals, warn=lambda m: None))
    first = [threading.Event(), threading.Event()]
    overlapped, errors = [], []

    def after_first_frame(i):
        # each stream waits, after its first frame, for the other's first frame: both are on the
        # server at once whatever the machine's speed (no timing involved)
        def progress(k, n, f):
            if not first[i].is_set():
                first[i].set()
                overlapped.append(first[1 - i].wait(timeout=300))
        return progress

    def stream(i):
        video, (sched, removals) = serve_videos[i], plans[i]
        try:
            model = RemoteModel(server.grpc_url)
            track(video.frames_dir_or_file, model, sched, tmp_path / f"remote{i}", overlay=False, removals=removals,
                  warn=lambda m: None, progress=after_first_frame(i))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert overlapped == [True, True]  # both streams were open on the server at the same time
    for i, video in enumerate(serve_videos):
        remote = json.loads((tmp_path / f"remote{i}" / "results.json").read_text())
        assert remote["status"] == "finished" and remote["bundle"]["server"] == server.grpc_url
        assert comparable(remote) == comparable(local[i])
        for f in range(video.num_frames):
            a = read_palette_png(tmp_path / f"local{i}" / "masks" / f"{f:05d}.png")
            b = read_palette_png(tmp_path / f"remote{i}" / "masks" / f"{f:05d}.png")
            assert np.array_equal(a, b), (i, f)
    # the scenario did what it says: stream 1 has object 2 from frame 2, object 1 gone at 3
    r1 = comparable(local[1])["frames"]
    assert sorted(r1[1]["objects"]) == ["1"] and sorted(r1[2]["objects"]) == ["1", "2"]
    assert sorted(r1[3]["objects"]) == ["2"]
    assert wait_for(lambda: metrics(server)["fastsam2_live_sessions"] == 0, 10)  # END freed both


def test_a_stream_over_max_sessions_is_refused(server, serve_videos, tmp_path):
    from fastsam2.serve.client import RemoteModel

    video = serve_videos[0]
    x, y = video.first_frame_points[1]
    model = RemoteModel(server.grpc_url)
    with contextlib.ExitStack() as held:
        for _ in range(2):
            held.enter_context(contextlib.closing(model.open_session()))
        r = run_cli(video.frames_dir_or_file, "--server", server.grpc_url, "--point", f"{x},{y}",
                    "--out", tmp_path / "r", "--quiet")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--max-sessions" in lines[0], r.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written
    # the refused sequence and the two held ones are all handed back
    assert wait_for(lambda: metrics(server)["fastsam2_live_sessions"] == 0, 10)
    r = run_cli(video.frames_dir_or_file, "--server", server.grpc_url, "--point", f"{x},{y}",
                "--out", tmp_path / "r2", "--quiet", "--max-frames", "1")
    assert r.returncode == 0, r.stderr


def test_client_runs_without_onnxruntime(server, serve_videos, tmp_path):
    """fastsam2-run --server on a client where onnxruntime (and openvino) cannot be imported."""
    import subprocess
    import sys

    video = serve_videos[1]
    x, y = video.first_frame_points[1]
    args = [str(video.frames_dir_or_file), "--server", server.grpc_url, "--point", f"{x},{y}",
            "--out", str(tmp_path / "r"), "--quiet", "--max-frames", "2"]
    code = ("import sys\n"
            "for m in ('onnxruntime', 'openvino', 'tensorrt', 'torch'): sys.modules[m] = None\n"
            "from fastsam2.runtime.run_cli import main\n"
            f"main(args={args!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 frames" in r.stdout
    assert json.loads((tmp_path / "r" / "results.json").read_text())["backend"] == "ort-cpu"
