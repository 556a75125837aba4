"""fastsam2-serve's launcher as an operator meets it: bad flags and a busy port are one `error:`
line (exit 2) with nothing written; the development install's .venv-serve is found without
FASTSAM2_SERVE_PYTHON, and where none is, the line says what to set; a start that fails removes
the repository it created; a model process that dies stops the node (exit 2, one line), and
Ctrl-C exits 130 with one line."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading

import pytest

from serve_helpers import SERVE_MARK, free_ports
from test_serve_lifecycle import ServeProcess, _alive, _stub_pids


def serve_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastsam2.serve.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("flags, line", [
    (["--idle-timeout", "inf"], "error: --idle-timeout must be a number of seconds > 0 and <= 604800 (a week), got inf"),
    (["--idle-timeout", "nan"], "error: --idle-timeout must be a number of seconds > 0 and <= 604800 (a week), got nan"),
    (["--idle-timeout", "-1"], "error: --idle-timeout must be a number of seconds > 0 and <= 604800 (a week), got -1.0"),
    (["--http-port", "70000"], "error: --http-port must be a TCP port 1..65535, got 70000"),
    (["--grpc-port", "0"], "error: --grpc-port must be a TCP port 1..65535, got 0"),
    (["--http-port", "9000", "--grpc-port", "9000"],
     "error: --http-port, --grpc-port and --metrics-port must differ, got 9000, 9000, 8002"),
])
def test_bad_flags_are_one_line(tmp_path, flags, line):
    r = serve_cli("--bundle", tmp_path / "b", "--repo", tmp_path / "repo", *flags, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [line], r.stderr
    assert not (tmp_path / "repo").exists()


class _Answer200(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@SERVE_MARK
def test_a_busy_port_is_refused_not_served(bundle_dir, tmp_path):
    """Another process answers the readiness probe on --http-port: the launcher used to print
    "serving" for a server that was not its own."""
    port, grpc, metrics = free_ports(3)
    other = http.server.HTTPServer(("127.0.0.1", port), _Answer200)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        r = serve_cli("--bundle", bundle_dir, "--repo", tmp_path / "repo", "--http-port", port,
                      "--grpc-port", grpc, "--metrics-port", metrics)
    finally:
        other.shutdown()
        other.server_close()
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --http-port {port} on 127.0.0.1 is in use: stop what holds it or choose another port"], r.stderr
    assert not (tmp_path / "repo").exists()


def _wheel_python_has_numpy2() -> bool:
    import numpy

    return int(numpy.__version__.split(".")[0]) >= 2


@SERVE_MARK
def test_the_serve_venv_is_found_without_the_variable(monkeypatch):
    """The README's command after the standard install: this Python has numpy 2 and
    scripts/install.sh made .venv-serve; fastsam2-serve finds it by itself."""
    from fastsam2.serve import server

    if not _wheel_python_has_numpy2() or not server.serve_venvs():
        pytest.skip("this Python has numpy<2 or there is no .venv-serve: nothing to find")
    monkeypatch.delenv("FASTSAM2_SERVE_PYTHON", raising=False)
    inst = server.Installation()
    inst.check()
    assert inst.python == str(server.serve_venvs()[0]) and inst.probe["numpy"].startswith("1.")


@SERVE_MARK
def test_without_a_serve_python_the_line_says_what_to_set(monkeypatch):
    from fastsam2.serve import server

    if not _wheel_python_has_numpy2():
        pytest.skip("this Python has numpy<2: it runs the server's model itself")
    monkeypatch.delenv("FASTSAM2_SERVE_PYTHON", raising=False)
    monkeypatch.setattr(server, "serve_venvs", lambda: [])
    with pytest.raises(server.ServerError, match=r"no \.venv-serve with numpy<2 was found: set "
                                                 r"FASTSAM2_SERVE_PYTHON to a Python with numpy<2 .*scripts/install\.sh"):
        server.Installation().check()


@SERVE_MARK
def test_a_failed_start_removes_the_repository_it_created(bundle_dir, tmp_path):
    fake = tmp_path / "triton" / "bin" / "tritonserver"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'E1205 fake: cannot start'\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "FASTSAM2_TRITONSERVER": str(fake)}
    ports = [str(p) for p in free_ports(3)]
    flags = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    r = serve_cli("--bundle", bundle_dir, "--repo", tmp_path / "repo", *flags, env=env)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == "error: tritonserver exited with code 1 before it was ready: E1205 fake: cannot start", r.stderr
    assert not (tmp_path / "repo").exists()
    # a folder the user had is theirs: kept (with what fastsam2 wrote in it)
    (tmp_path / "mine").mkdir()
    r = serve_cli("--bundle", bundle_dir, "--repo", tmp_path / "mine", *flags, env=env)
    assert r.returncode == 2 and (tmp_path / "mine").is_dir()


@SERVE_MARK
def test_a_dead_model_process_stops_the_node_and_ctrl_c_exits_130(bundle_dir, tmp_path):
    import urllib.request

    ports = free_ports(3)
    serve = ServeProcess(bundle_dir, tmp_path / "repo", ports)
    try:
        serve.wait_serving()
        triton = serve.tritonserver_pid()
        (stub,) = _stub_pids(tmp_path / "repo")
        os.kill(stub, signal.SIGKILL)  # the model process dies (as a crash in it would)
        assert serve.proc.wait(60) == 2, serve.lines[-5:]
        assert serve.lines[-1].startswith(f"error: the tracker's model process (pid {stub}) died"), serve.lines[-3:]
        assert not _alive(triton)
        with pytest.raises(OSError):  # the node answers no readiness probe: a balancer routes around it
            urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=5)
    finally:
        serve.stop()
    serve = ServeProcess(bundle_dir, tmp_path / "repo", ports)
    try:
        serve.wait_serving()
        triton = serve.tritonserver_pid()
        serve.proc.send_signal(signal.SIGINT)
        assert serve.proc.wait(60) == 130, serve.lines[-5:]
        assert serve.lines[-1] == "error: interrupted by Ctrl-C; tritonserver stopped", serve.lines[-3:]
        assert not _alive(triton)
    finally:
        serve.stop()
