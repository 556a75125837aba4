"""fastsam2-run's --server option without a server: exactly one of --bundle / --server, a
malformed address and an address nobody serves are each one `error:` line, exit 2, nothing
written."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fastsam2.runtime.run_cli import main
from serve_helpers import free_ports


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.mark.parametrize("where", [[], ["--bundle", "b", "--server", "127.0.0.1:1"]])
def test_exactly_one_of_bundle_and_server(where, tmp_path):
    code, out = run(tmp_path, "--point", "1,1", "--out", tmp_path / "r", *where)
    assert code == 2 and out.strip().splitlines() == [
        "error: give exactly one of --bundle (run here) or --server HOST:PORT (run on a Triton server)"]
    assert not (tmp_path / "r").exists()


def test_malformed_server_address(tmp_path):
    code, out = run(tmp_path, "--point", "1,1", "--server", "gpu-box", "--out", tmp_path / "r")
    assert code == 2 and out.strip().splitlines() == [
        "error: --server must be HOST:PORT (Triton's gRPC port, 8001 by default), got 'gpu-box'"]


def test_nobody_serving_there(tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="the [client] extra is not installed (tritonclient[grpc])")
    (port,) = free_ports(1)
    code, out = run(tmp_path, "--point", "1,1", "--server", f"127.0.0.1:{port}", "--out", tmp_path / "r")
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1, out
    assert lines[0].startswith(f"error: cannot reach the Triton server at 127.0.0.1:{port}")
    assert not (tmp_path / "r").exists()


def test_the_client_side_imports_neither_onnxruntime_nor_torch():
    """What `fastsam2-run --server` loads: the client, the protocol and the CLI, with the
    inference packages made unimportable (an import of any of them raises)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('onnxruntime', 'openvino', 'tensorrt', 'torch'): sys.modules[m] = None\n"
            "import fastsam2.serve.client, fastsam2.serve.protocol, fastsam2.runtime.run_cli, fastsam2.runtime.track\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
