"""fastsam2-run touches only what it should: under strace, a run opens no network socket to
anywhere and writes nothing outside the output folder and the documented cache folder
($XDG_CACHE_HOME/fastsam2: OpenVINO's compiled models, ORT-TensorRT engines of read-only
bundles). What it reads from the bundle, the input and the installed packages is not limited."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None or not sys.platform.startswith("linux"),
                                reason="needs strace (Linux)")

# opens that can create or change a file
_WRITE_OPEN = re.compile(r'open(?:at)?\((?:AT_FDCWD|\d+), "([^"]+)", ([A-Z_|]+)')
_PATH_CALLS = re.compile(r'\b(mkdir(?:at)?|unlink(?:at)?|rename(?:at2?)?|rmdir|creat|truncate|link(?:at)?|'
                         r'symlink(?:at)?|chmod|fchmodat|utimensat)\((?:AT_FDCWD, |\d+, )?"([^"]+)"')
_CONNECT = re.compile(r'connect\(\d+, \{sa_family=(AF_INET6?|AF_UNIX|AF_NETLINK)[^}]*\}')
_SOCKET = re.compile(r'socket\((AF_INET6?|AF_PACKET)')


def written_paths(log: str) -> set:
    """Paths the traced processes opened for writing, created, renamed, removed or changed."""
    out = set()
    for line in log.splitlines():
        if " = -1 " in line:  # a failed call touched nothing
            continue
        m = _WRITE_OPEN.search(line)
        if m and re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND", m.group(2)):
            out.add(m.group(1))
        for m in _PATH_CALLS.finditer(line):
            out.add(m.group(2))
    return out


def network_calls(log: str) -> list:
    return [ln for ln in log.splitlines() if _SOCKET.search(ln) or
            (_CONNECT.search(ln) and _CONNECT.search(ln).group(1).startswith("AF_INET"))]


def outside(paths: set, allowed: list) -> list:
    def ok(p: str) -> bool:
        if p.startswith("/dev/") or p.startswith("/proc/self/") or p.startswith("/proc/thread-self/"):
            return True  # /dev/null, /dev/shm semaphores, the process's own /proc entries
        rp = os.path.realpath(p)
        return any(rp == str(a) or rp.startswith(str(a) + os.sep) for a in allowed)
    return sorted(p for p in paths if not ok(p))


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_run_writes_only_outputs_and_cache_and_opens_no_socket(bundle_dir, synth, tmp_path, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    home, cache, out = tmp_path / "home", tmp_path / "cache", tmp_path / "out"
    home.mkdir()
    cache.mkdir()  # the user's cache root exists (~/.cache); only cache/fastsam2 is ours to write
    log = tmp_path / "strace.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "FASTSAM2_"))}
    # python's own .pyc cache is python's, not fastsam2's: keep it out of the picture
    env.update(HOME=str(home), XDG_CACHE_HOME=str(cache), PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    x, y = synth.first_frame_points[1]
    cmd = [STRACE, "-f", "-qq", "-e", "trace=%file,%network", "-o", str(log),
           sys.executable, "-m", "fastsam2.runtime.run_cli", str(synth.frames_dir_or_file), "--bundle", str(bundle_dir),
           "--point", f"{x},{y}", "--backend", backend, "--out", str(out), "--max-frames", "2", "--threads", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "results.json").is_file()
    text = log.read_text()
    assert "execve(" in text and "results.json" in text  # the trace saw the run
    assert network_calls(text) == []
    # the temporary folder counts as the run's own (PyAV/tempfile scratch), as do outputs and cache
    assert outside(written_paths(text), [out, cache / "fastsam2", tmp_path / "tmp"]) == []
    assert not (cache / "Microsoft").exists()  # onnxruntime's telemetry store (1DS)
    assert not (home / "intel").exists()  # openvino_telemetry's consent folder


def test_the_checker_sees_a_stray_write_and_a_socket(tmp_path):
    """The parsing above must be able to fail: a write outside and a TCP socket are caught."""
    log = "\n".join([
        f'123 openat(AT_FDCWD, "{tmp_path}/out/results.json", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 3',
        '123 openat(AT_FDCWD, "/root/.onnxruntime/telemetry.log", O_WRONLY|O_CREAT, 0644) = 4',
        '123 openat(AT_FDCWD, "/usr/lib/libfoo.so", O_RDONLY|O_CLOEXEC) = 5',
        '123 mkdir("/var/tmp/stray", 0777) = 0',
        '124 socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_TCP) = 6',
        '124 connect(6, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("1.2.3.4")}, 16) = 0',
    ])
    assert outside(written_paths(log), [tmp_path / "out"]) == ["/root/.onnxruntime/telemetry.log", "/var/tmp/stray"]
    assert len(network_calls(log)) == 2
