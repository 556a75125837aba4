"""Streams that survive: three fastsam2-serve nodes behind the shipped HAProxy config, a real
redis-server as their state store, four streams; one node is SIGKILLed mid-stream and another
drained (SIGTERM); every stream's logits equal its uninterrupted local run's."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from serve_helpers import SERVE_MARK, free_ports, wait_for
from services import children, haproxy, redis_server, stop

pytestmark = SERVE_MARK
FRAMES = 8
# measured: the server's logits equal the local session's bit for bit at 256 px (the restored
# sessions too); the bound leaves room for another numpy's float order
ATOL = 1e-6


@contextlib.contextmanager
def node(bundle, tmp, store_url, idle=60):
    """One fastsam2-serve process (the command a user runs) on free ports; yields
    (process, grpc port, http port)."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "fastsam2.serve.cli", "--bundle", str(bundle), "--repo", str(tmp / "repo"),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--idle-timeout", str(idle)] + (["--state-store", store_url] if store_url else [])
    tmp.mkdir(parents=True, exist_ok=True)
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, grpc, http
    finally:
        for p in children(proc.pid):  # tritonserver leads its own group (its stubs are in it)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p, signal.SIGKILL)
        stop(proc, timeout=30)
        log.close()


def ready(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/fastsam2_tracker/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def kill_node(proc) -> None:
    """A node's death: the launcher and its tritonserver with its model processes, SIGKILL."""
    for p in children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p, signal.SIGKILL)
    proc.kill()
    proc.wait(30)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from fastsam2.calibration.synthetic import make_video

    root = tmp_path_factory.mktemp("failover_videos")
    return [make_video(root / f"v{i}", num_frames=FRAMES, size=(120, 160), seed=40 + i, fmt="jpg") for i in range(4)]


def frames_of(video) -> list:
    from fastsam2.runtime.video import open_frames

    with open_frames(video.frames_dir_or_file) as src:
        return [rgb for _, rgb in src]


def local_logits(bundle_dir, video, keep) -> list:
    from fastsam2.runtime.session import Session

    with Session.open(bundle_dir, keep=keep, backend="ort-cpu", num_frames=FRAMES, warn=lambda m: None) as s:
        s.add_prompt(1, points=[tuple(video.first_frame_points[1])])
        return [s.push(rgb).objects[1].logits.copy() for rgb in frames_of(video)]


def test_streams_survive_a_killed_and_a_drained_node(bundle_dir, videos, tmp_path):
    from fastsam2.serve.client import RemoteModel

    keeps = [1.0, 0.5, 0.3, 0.5]
    want = [local_logits(bundle_dir, v, k) for v, k in zip(videos, keeps)]
    with contextlib.ExitStack() as stack:
        store, _ = stack.enter_context(redis_server(tmp_path / "redis"))
        nodes = [stack.enter_context(node(bundle_dir, tmp_path / f"n{i}", store)) for i in range(3)]
        assert wait_for(lambda: all(ready(h) for _, _, h in nodes), timeout=400, step=1), \
            [(tmp_path / f"n{i}" / "serve.log").read_text()[-2000:] for i in range(3)]
        balancer, _ = stack.enter_context(haproxy([(g, h) for _, g, h in nodes], tmp_path / "haproxy"))
        by_node = {f"127.0.0.1:{g}": p for p, g, _ in nodes}
        model = RemoteModel(balancer, timeout=120)
        assert model.info["state_store"] is True
        streams = []
        for v, k in zip(videos, keeps):
            s = model.open_session(keep=k, num_frames=FRAMES, frame_size=(v.width, v.height))
            s.add_prompt(1, points=[tuple(v.first_frame_points[1])])
            streams.append(s)
        got = [[] for _ in streams]
        rgbs = [frames_of(v) for v in videos]
        killed = drained = None
        for i in range(FRAMES):
            if i == 3:  # a node dies with the streams it holds mid-way
                killed = streams[0].node
                kill_node(by_node[killed])
            if i == 5:  # another is drained: Triton finishes what it runs, then stops
                drained = next(s.node for s in streams if s.node != killed)
                by_node[drained].send_signal(signal.SIGTERM)
                assert by_node[drained].wait(120) == 143
            for j, s in enumerate(streams):
                got[j].append(s.push(rgbs[j][i]).objects[1].logits.copy())
        assert killed != drained and all(s.node not in (killed, drained) for s in streams)
        for j, s in enumerate(streams):
            worst = max(float(np.abs(a - b).max()) for a, b in zip(got[j], want[j]))
            assert worst <= ATOL, (j, keeps[j], worst)
            assert all(((a > 0) == (b > 0)).all() for a, b in zip(got[j], want[j]))
            s.close()
