"""fastsam2-serve as an operator runs it: a server killed mid-stream gives the client one error
line, exit 2 and complete outputs so far; a restarted server accepts new streams and frees a
stream that went away after its idle timeout; SIGTERM stops the server cleanly (exit 143 with one line, no
tritonserver left)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from fastsam2.runtime.outputs import read_palette_png
from serve_helpers import SERVE_MARK, free_ports, metrics, run_cli, wait_for

pytestmark = SERVE_MARK
# long enough for one stream's frames on a loaded 2-core machine (~3 s each at 256 px), short
# enough to wait for
IDLE_S = 8.0


class ServeProcess:
    """`fastsam2-serve` in a child process; its stderr lines are read by a thread."""

    def __init__(self, bundle, repo, ports, *extra):
        http, grpc, metrics = ports
        self.grpc = f"127.0.0.1:{grpc}"
        self.metrics_port = metrics
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsam2.serve.cli", "--bundle", str(bundle), "--repo", str(repo),
             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line)

    def wait_serving(self, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(ln.startswith("serving ") for ln in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("fastsam2-serve did not start:\n" + "\n".join(self.lines[-20:]))

    def tritonserver_pid(self) -> int:
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.name() == "tritonserver":
                    return child.pid
            except psutil.Error:
                continue
        raise AssertionError("no tritonserver child")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def abandoned_stream_is_freed(serve, video):
    """A client that stops sending without END: the server frees its session (and memory bank)
    after the idle timeout, and says so if the stream comes back."""
    from PIL import Image

    from fastsam2.serve.client import RemoteModel
    from fastsam2.serve.protocol import ServerError

    frames = sorted(video.frames_dir_or_file.glob("*.jpg"))
    before = metrics(serve)
    s = RemoteModel(serve.grpc).open_session()
    s.add_prompt(1, points=[video.first_frame_points[1]])
    for f in frames[:3]:
        s.push(np.asarray(Image.open(f).convert("RGB")))
    held = metrics(serve)
    assert held["fastsam2_live_sessions"] == 1
    assert held["fastsam2_memory_bank_bytes"] == s.memory_bytes() > 0
    freed = wait_for(lambda: (m := metrics(serve))["fastsam2_live_sessions"] == 0 and m, IDLE_S + 15)
    assert freed, metrics(serve)
    assert freed["fastsam2_memory_bank_bytes"] == 0
    assert freed["fastsam2_sessions_freed_idle"] == before["fastsam2_sessions_freed_idle"] + 1
    # the process gives the memory back (malloc_trim after the free): measured here at 256 px,
    # bank 1.6 MB, RSS 314.8 -> 309.0 MB (-5.9 MB); ask for at least half the bank (~7x margin)
    assert freed["fastsam2_process_rss_bytes"] <= held["fastsam2_process_rss_bytes"] - held["fastsam2_memory_bank_bytes"] // 2
    with pytest.raises(ServerError, match="no longer holds this stream"):
        s.push(np.asarray(Image.open(frames[3]).convert("RGB")))
    s.close()


def _alive(pid: int) -> bool:
    try:  # a zombie waiting for its parent's wait() is gone for our purpose
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stub_pids(path) -> list:
    """The live python-backend stubs serving the repository at `path`."""
    found = []
    for proc in psutil.process_iter():
        try:
            text = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if str(path) in text and "triton_python_backend_stub" in text:
            found.append(proc.pid)
    return sorted(found)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    from fastsam2.calibration.synthetic import make_video

    return make_video(tmp_path_factory.mktemp("long"), num_frames=24, size=(240, 320), seed=3, fmt="jpg")


def test_killed_server_restarted_server_and_sigterm(bundle_dir, long_video, tmp_path):
    ports = free_ports(3)
    x, y = long_video.first_frame_points[1]
    serve = ServeProcess(bundle_dir, tmp_path / "repo", ports, "--idle-timeout", "30")
    client = None
    try:
        serve.wait_serving()
        triton = serve.tritonserver_pid()
        out = tmp_path / "r"
        client = subprocess.Popen([sys.executable, "-m", "fastsam2.runtime.run_cli", str(long_video.frames_dir_or_file),
                                   "--server", serve.grpc, "--point", f"{x},{y}", "--out", str(out), "--quiet"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: (out / "masks" / "00001.png").exists() or client.poll() is not None, 240, 0.05)
        # one model process hangs in its shutdown (seen here once: futex waits, SIGTERM ignored);
        # a stopped process stands in for it: it cannot exit by itself when its server dies
        hung = _stub_pids(tmp_path / "repo")[0]
        os.kill(hung, signal.SIGSTOP)
        os.kill(triton, signal.SIGKILL)  # the server dies mid-stream
        _, err = client.communicate(timeout=120)
        assert client.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "lost the Triton server" in lines[0], err
        res = json.loads((out / "results.json").read_text())
        masks = sorted((out / "masks").glob("*.png"))
        assert res["status"] == "failed" and "lost the Triton server" in res["error"]
        assert 2 <= len(res["frames"]) == len(masks) < long_video.num_frames
        assert [f["frame"] for f in res["frames"]] == list(range(len(masks)))
        assert all(read_palette_png(m).shape == (240, 320) for m in masks)
        assert (out / "overlay.mp4").stat().st_size > 0
        assert not list(out.rglob("*.tmp*"))  # no half-written file left
        # the launcher sees its server die, kills the hung model process, and says so
        serve.proc.wait(60)
        assert serve.proc.returncode == 2 and serve.lines[-1].startswith("error: tritonserver stopped"), serve.lines[-3:]
        killed = re.search(r"; killed \d+ model process\(es\) it left running \(pid ([\d, ]+)\)$", serve.lines[-1])
        assert killed and hung in [int(p) for p in killed.group(1).split(", ")], serve.lines[-1]
        # no orphaned stub
        assert wait_for(lambda: not _stub_pids(tmp_path / "repo"), 10), _stub_pids(tmp_path / "repo")
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        serve.stop()

    # restarted on the same ports and repository: new streams are accepted
    serve = ServeProcess(bundle_dir, tmp_path / "repo", ports, "--idle-timeout", str(IDLE_S))
    try:
        serve.wait_serving()
        triton = serve.tritonserver_pid()
        r = run_cli(long_video.frames_dir_or_file, "--server", serve.grpc, "--point", f"{x},{y}",
                    "--out", tmp_path / "r2", "--quiet", "--max-frames", "2")
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "r2" / "results.json").read_text())["status"] == "finished"
        abandoned_stream_is_freed(serve, long_video)
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(60) == 143, serve.lines[-5:]  # 128 + SIGTERM, as every command
        assert serve.lines[-1] == "error: interrupted by SIGTERM; tritonserver stopped", serve.lines[-3:]
        assert not _alive(triton)
    finally:
        serve.stop()
