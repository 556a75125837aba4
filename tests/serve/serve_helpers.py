"""Helpers and fixtures of the serving tests (each module imports them and sets
`pytestmark = SERVE_MARK`): a real tritonserver (nvidia-pytriton's wheel) on 127.0.0.1, free ports, the
session's test bundle (256 px), short generated videos. One server per module where the tests
can share it; every server is stopped in a finally.

Skipped, with the reason, only where the [serve] extra is not installed or cannot run the
python backend here (its stub needs numpy<2: FASTSAM2_SERVE_PYTHON may name an interpreter,
e.g. a venv with numpy<2, that the server's model runs in).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import pytest


def _serve_unavailable() -> str | None:
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        return "the [serve] extra is not installed (tritonclient[grpc]): pip install -e '.[serve]'"
    from fastsam2.serve.protocol import ServerError
    from fastsam2.serve.server import Installation

    try:
        Installation().check()
    except ServerError as e:
        return f"the [serve] extra cannot run here: {e}"
    return None


SKIP = _serve_unavailable()
SERVE_MARK = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def free_ports(n: int) -> list:
    """n distinct free TCP ports on 127.0.0.1 (held together while picked, so distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def running_server(bundle, repo, **options):
    """fastsam2-serve's library path: write the repository, start tritonserver on free ports,
    stop it (SIGTERM, then SIGKILL) whatever happens."""
    from fastsam2.serve.repository import write_repository
    from fastsam2.serve.server import TritonServer

    write_repository(bundle, repo, **options)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, address="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics)
    try:
        server.start(timeout=240)
        yield server
    finally:
        server.stop()


def metrics(server) -> dict:
    """The fastsam2_* gauges of a TritonServer (or anything with metrics_port)."""
    from fastsam2.serve.client import read_metrics

    return read_metrics(f"http://127.0.0.1:{server.metrics_port}/metrics")


def wait_for(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def run_cli(*args, timeout=300, env=None):
    """fastsam2-run in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fastsam2.runtime.run_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def serve_videos(tmp_path_factory):
    """Two short generated videos (240x320, two objects each) for concurrent streams."""
    from fastsam2.calibration.synthetic import make_video

    root = tmp_path_factory.mktemp("serve_videos")
    return [make_video(root / f"v{i}", num_frames=4, size=(240, 320), seed=10 + i, objects=2, fmt="jpg")
            for i in range(2)]
