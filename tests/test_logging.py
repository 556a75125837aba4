"""Messages go through the logging module: library code logs (and, with logging left as Python
sets it up, prints nothing on stdout), and each command prints its lines as it always did, on
the same stream, in the same order, with no level prefix (runtime/console.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import THREADS, own_bundle

PREFIXES = ("INFO", "WARNING", "DEBUG", "ERROR", "fastsam2.")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from fastsam2.runtime.synthetic import make_video

    return make_video(tmp_path_factory.mktemp("logv"), num_frames=3, size=(120, 160), seed=3).frames_dir_or_file


def _python(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _plain(lines) -> None:
    assert lines and not [ln for ln in lines if ln.startswith(PREFIXES)], lines


LIBRARY_CALLS = """
import sys
from fastsam2.calibration.int8 import write_int8_calibration
from fastsam2.runtime.bundle import load_bundle
from fastsam2.runtime.precision import graph_precisions
from fastsam2.runtime.track import PromptSpec, track

bundle, frames, out = sys.argv[1:]
graph_precisions(load_bundle(bundle), "ort-cuda", "int8")
write_int8_calibration(bundle, frames, max_frames=2, threads=1)
track(frames, bundle, PromptSpec(points=[(80, 60)]), out, backend="ort-cpu", overlay=False, max_frames=2,
      threads=1)
"""


def test_library_code_prints_nothing_on_stdout(bundle_dir, frames, tmp_path):
    """Called from a program that configured no logging, the libraries print nothing on stdout
    (they printed their progress and warnings there): progress is dropped, warnings reach
    stderr as Python's logging does by default, as plain lines."""
    b = own_bundle(bundle_dir, tmp_path / "b")
    r = _python("-c", LIBRARY_CALLS, b, frames, tmp_path / "r")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == ""
    said = r.stderr.splitlines()
    assert "warning: ort-cuda runs the fp32 graphs; the CPU precision asked for applies to ort-cpu and " \
           "openvino only" in said, said
    assert any(ln.startswith("warning: the bundle's router is untrained") for ln in said), said
    assert not any("recorded 2 frames" in ln for ln in said)  # INFO: not shown unless a command asks


def test_calibrate_prints_its_progress_lines_plain(bundle_dir, frames, tmp_path):
    """fastsam2-calibrate int8 in a process of its own: its progress on stderr exactly as before
    (no `INFO:` or logger name), the summary on stdout."""
    b = own_bundle(bundle_dir, tmp_path / "b")
    r = _python("-m", "fastsam2.calibration.calibrate_cli", "int8", "--bundle", b, "--frames", frames,
                "--max-frames", 2, "--threads", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.splitlines() == [
        "recorded 2 frames at keep 1.0 (k = 256 of 256 tokens), prompt 'cyclist'",
        "note: target cpu builds in fp32; the data serves an int8 profile"], r.stderr
    assert r.stdout.startswith("wrote 5 calibration files (") and r.stdout.count("\n") == 1, r.stdout


def test_precision_module_prints_its_gate_plain(bundle_dir, tmp_path):
    """`python -m fastsam2.export.precision` runs the module as __main__: its gate lines still
    reach stderr, plain; the JSON summary alone is stdout."""
    b = own_bundle(bundle_dir, tmp_path / "b")
    r = _python("-m", "fastsam2.export.precision", b, "--precision", "memory_attention=int8",
                "--gate-videos", 1, "--gate-frames", 2, "--threads", THREADS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["precision_gate"]["explicit"] is True
    ours = [ln for ln in r.stderr.splitlines() if not ln.startswith("WARNING:root:")]  # onnxruntime's own
    _plain(ours)
    assert ours[0].startswith("memory_attention int8/dynamic: ") and " the gate (>= 0.97)" in ours[0], ours
    assert ours[-1].startswith("precision: "), ours


def test_precision_module_bad_value_is_one_line(bundle_dir, tmp_path):
    r = _python("-m", "fastsam2.export.precision", tmp_path / "nowhere", "--gate-videos", "two")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: invalid value for '--gate-videos': 'two' is not a valid integer "
                                     "(see python -m fastsam2.export.precision --help)"], r.stderr


def test_export_warns_about_random_weights_before_its_progress(monkeypatch, tmp_path):
    """fastsam2-export without a checkpoint: the random-weights warnings first (before the
    minutes of work), then the export's progress lines, then the summary; all plain. The graph
    export itself is stood in for: what is checked is where its lines go."""
    from fastsam2.export import onnx_export
    from fastsam2.export.cli import main

    def write_bundle(pruned, out, **kw):
        logging.getLogger("fastsam2.export.onnx_export").info("exported image_encoder: 1.0 MB, 9 op types")
        return {"graphs": {"image_encoder": {"bytes": 10**6}}, "export_seconds": 0.5}

    monkeypatch.setattr(onnx_export, "write_bundle", write_bundle)
    res = CliRunner().invoke(main, ["--target", "cpu", "--keep", "1.0", "--prompts", "cyclist", "--text-pretrained",
                                    "random", "--image-size", "256", "--precision", "fp32", "--out",
                                    str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert lines[0].startswith("warning: no SAM2 checkpoint"), lines
    assert lines[1].startswith("warning: text encoder ViT-B-32 is randomly initialised"), lines
    assert lines[2:] == ["exported image_encoder: 1.0 MB, 9 op types"], lines
    assert res.stdout.startswith("wrote bundle ") and res.stdout.count("\n") == 1, res.stdout


def test_console_is_one_handler_for_the_command_only(capsys):
    """While a command runs, fastsam2's INFO lines print plain on the stream it names; after it,
    nothing of it stays configured."""
    from fastsam2.runtime.console import messages

    logger = logging.getLogger("fastsam2.runtime.track")
    before = list(logging.getLogger("fastsam2").handlers)
    with messages(err=False):
        logger.info("one")
        logger.debug("not shown")
    with messages(err=True):
        logger.warning("warning: two")
    with messages(quiet=True):
        logger.warning("warning: not shown")
    logger.info("not shown either")
    assert capsys.readouterr() == ("one\n", "warning: two\n")
    assert logging.getLogger("fastsam2").handlers == before
