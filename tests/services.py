"""Real servers the scale-out tests start on 127.0.0.1: redis-server and haproxy.

Each binds a free port, is waited for with a bound, and is stopped (and its files removed) by
the context manager that started it. CI installs both (scripts/install.sh); where one is missing
outside CI the tests that need it skip, in CI they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(binary: str) -> str:
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}")
                                         if os.access(p, os.X_OK)), None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not installed (scripts/install.sh installs it)")
        pytest.skip(f"{binary} is not installed (scripts/install.sh installs it)")
    return path


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{proc.args[0]} did not listen on {port} within {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@contextlib.contextmanager
def redis_server(tmp: Path):
    """Yields redis://127.0.0.1:PORT/0 of a fresh redis-server (no persistence)."""
    exe = need("redis-server")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp), "--protected-mode", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        stop(proc)


@contextlib.contextmanager
def haproxy(nodes: list, tmp: Path):
    """deploy/haproxy/haproxy.cfg itself, on a free port, in front of `nodes` [(grpc port, http
    port)] (three, as the shipped config names them). Yields the balancer's HOST:PORT."""
    exe = need("haproxy")
    cfg = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
    port = free_port()
    env = {**os.environ, "FASTSAM2_LISTEN": f"127.0.0.1:{port}"}
    for i, (grpc, http) in enumerate(nodes, 1):
        env[f"FASTSAM2_NODE{i}"], env[f"FASTSAM2_NODE{i}_HTTP"] = f"127.0.0.1:{grpc}", str(http)
    tmp.mkdir(parents=True, exist_ok=True)
    log = open(tmp / "haproxy.log", "wb")
    proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        yield f"127.0.0.1:{port}", proc
    finally:
        stop(proc)
        log.close()


def children(pid: int) -> list:
    """The pids whose parent is `pid` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
    return out
