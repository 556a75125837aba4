"""fastsam2-export against a hostile user: what --force may replace (a fastsam2 bundle or an empty
folder, nothing else), outputs refused before any model is built, Ctrl-C and SIGTERM mid-export
(one line, 130/143, no temp folder left), and the flags' own errors as one `error:` line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from fastsam2.export.cli import main
from fastsam2.export.out_dir import staged_bundle, swap_in
from fastsam2.runtime.errors import InputError, OutputError

ARGS = ["--config", "sam2.1_hiera_t", "--target", "cpu", "--keep", "1.0", "--text-pretrained", "random",
        "--image-size", "256", "--precision", "fp32"]


def run(args):
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


def one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Building a model is the work a refused output must never reach."""
    import fastsam2.export.sam2_loader as loader
    import fastsam2.export.text as text

    def built(*a, **k):
        raise AssertionError("a model was built for an output that is refused")

    monkeypatch.setattr(loader, "load_sam2", built)
    monkeypatch.setattr(text, "compute_text_embeddings", built)


def fake_bundle(folder, version="0.0.1"):
    """An earlier fastsam2 bundle: its manifest (any version) and the one file its seal lists."""
    folder.mkdir()
    (folder / "image_encoder.onnx").write_bytes(b"old graph")
    (folder / "manifest.json").write_text(json.dumps({
        "format": 1, "fastsam2_version": version, "graphs": {},
        "seal": {"format": 1, "files": {"image_encoder.onnx": "0" * 64}, "sha256": "0" * 64}}))
    return folder


def hidden_left(parent, name):
    return sorted(p.name for p in parent.glob(f".{name}.*"))


# -- what --force may replace ----------------------------------------------------------------

def test_force_in_the_current_folder_with_a_users_file_is_refused(tmp_path, monkeypatch, no_model):
    (tmp_path / "a.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    code, text = run(ARGS + ["--prompts", "x", "--out", ".", "--force"])
    line = one_error_line(text)
    assert code == 2 and "current folder" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "mine"
    assert hidden_left(tmp_path.parent, tmp_path.name) == []


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_a_folder_of_user_files_is_never_replaced(tmp_path, no_model, force):
    out = tmp_path / "notabundle"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "clip.mp4").write_bytes(b"video")
    code, text = run(ARGS + ["--prompts", "x", "--out", str(out), *force])
    line = one_error_line(text)
    assert code == 2 and "not a fastsam2 bundle" in line and "--force replaces only" in line, line
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "clip.mp4").read_bytes() == b"video"
    assert hidden_left(tmp_path, "notabundle") == []


def test_a_bundle_holding_a_users_file_is_not_replaced(tmp_path, no_model):
    out = fake_bundle(tmp_path / "b")
    (out / "my_notes.txt").write_text("mine")
    code, text = run(ARGS + ["--prompts", "x", "--out", str(out), "--force"])
    line = one_error_line(text)
    assert code == 2 and "my_notes.txt" in line, line
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "image_encoder.onnx").exists()


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_a_regular_file_as_out_is_refused_before_any_work(tmp_path, no_model, force):
    f = tmp_path / "regular_file"
    f.write_text("data")
    code, text = run(ARGS + ["--prompts", "x", "--out", str(f), *force])
    line = one_error_line(text)
    assert code == 2 and "is not a folder" in line, line
    assert f.read_text() == "data" and hidden_left(tmp_path, "regular_file") == []


def test_an_existing_bundle_or_empty_folder_needs_force(tmp_path, no_model):
    for out in (fake_bundle(tmp_path / "b"), tmp_path / "empty"):
        out.mkdir(exist_ok=True)
        code, text = run(ARGS + ["--prompts", "x", "--out", str(out)])
        assert code == 2 and "pass --force to replace it" in one_error_line(text)


# -- the swap at the end: only a bundle or an empty folder is replaced ---------------------------

def finished(tmp_path):
    tmp = tmp_path / ".b.new"
    tmp.mkdir()
    (tmp / "manifest.json").write_text("{}")
    return tmp


def test_swap_refuses_a_folder_that_gained_user_files_during_the_export(tmp_path):
    out = tmp_path / "b"
    out.mkdir()  # empty when the export started; a user saved a file into it since
    (out / "a.txt").write_text("mine")
    tmp = finished(tmp_path)
    with pytest.raises(OutputError, match="not a fastsam2 bundle"):
        swap_in(tmp, out, force=True)
    assert (out / "a.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert hidden_left(tmp_path, "b") == [".b.new"]  # the caller (staged_bundle) removes its own


@pytest.mark.parametrize("earlier", ["bundle", "empty"])
def test_swap_replaces_a_bundle_or_an_empty_folder_and_leaves_nothing_hidden(tmp_path, earlier):
    out = fake_bundle(tmp_path / "b") if earlier == "bundle" else tmp_path / "b"
    out.mkdir(exist_ok=True)
    swap_in(finished(tmp_path), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "{}" and hidden_left(tmp_path, "b") == []


def test_staged_bundle_removes_its_folder_on_any_exception(tmp_path):
    out = fake_bundle(tmp_path / "b")
    for exc in (KeyboardInterrupt(), InputError("bad")):
        with pytest.raises(type(exc)):
            with staged_bundle(out, force=True) as tmp:
                (tmp / "graph.onnx").write_bytes(b"partial")
                assert tmp.parent == tmp_path and tmp.name.startswith(".b.")
                raise exc
        assert hidden_left(tmp_path, "b") == [] and (out / "image_encoder.onnx").read_bytes() == b"old graph"
    with staged_bundle(out, force=True) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] and hidden_left(tmp_path, "b") == []


# -- flags -------------------------------------------------------------------------------------

def test_help_marks_out_and_target_required_and_list_targets_runs_alone():
    code, text = run(["--help"])
    assert code == 0
    for flag in ("--out", "--target"):
        block = text[text.index(f"  {flag} "):]
        block = block[:block.index("\n  --", 1)]
        assert "[required]" in block, block
    code, text = run(["--list-targets"])
    assert code == 0 and "jetson-orin" in text and "error" not in text


@pytest.mark.parametrize("args, missing", [(["--target", "cpu"], "--out"), (["--out", "o"], "--target")])
def test_a_missing_required_option_is_one_line(tmp_path, args, missing):
    code, text = run(args)
    line = one_error_line(text)
    assert code == 2 and f"missing option '{missing}'" in line and "Usage:" not in text, line


def test_no_prompts_at_all_says_how_to_give_them(tmp_path, no_model):
    code, text = run(ARGS + ["--out", str(tmp_path / "o")])
    line = one_error_line(text)
    assert code == 2 and "no text prompts" in line and "--prompts-file" in line, line
    assert "empty prompt" not in line


@pytest.mark.parametrize("content", ["", "# only a comment\n"])
def test_an_empty_prompts_file_names_the_file(tmp_path, no_model, content):
    f = tmp_path / "prompts.txt"
    f.write_text(content)
    code, text = run(ARGS + ["--prompts-file", str(f), "--out", str(tmp_path / "o")])
    line = one_error_line(text)
    assert code == 2 and "prompts.txt' holds none" in line, line


READ_PROMPTS = """
import resource, sys
# a regression reads /dev/zero until memory runs out: let that be a MemoryError here
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from fastsam2.export.text import parse_prompts
from fastsam2.runtime.errors import InputError
for f in sys.argv[1:]:
    try:
        parse_prompts(None, f)
    except InputError as e:
        print(e)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_device_as_prompts_file_is_refused_at_once(tmp_path):
    """A FIFO with no writer (open would wait forever) and /dev/zero (endless): refused without
    reading, in a child bounded in time and memory so that a regression fails instead of hanging."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-c", READ_PROMPTS, str(fifo), "/dev/zero"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        f"prompts file '{fifo}' is not a regular file", "prompts file '/dev/zero' is not a regular file"], r


def test_the_random_weights_warning_comes_before_the_work(tmp_path, monkeypatch):
    """Without --checkpoint the warning is the first line, before SAM2 is even built (here the
    build stops the run: what was printed by then is what a user saw before minutes of work)."""
    import fastsam2.export.sam2_loader as loader

    def stop(*a, **k):
        raise InputError("stopped where the work starts")

    monkeypatch.setattr(loader, "load_sam2", stop)
    code, text = run(ARGS + ["--prompts", "x", "--out", str(tmp_path / "o")])
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 2, text
    assert lines[0].startswith("warning: no SAM2 checkpoint given") and "NOT meaningful" in lines[0]
    assert lines[1] == "error: stopped where the work starts"


# -- signals mid-export (a real process) -------------------------------------------------------

def _default_sigint():
    # a shell's background job starts with SIGINT ignored, and Python then keeps it ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_mid_export_removes_the_temp_folder_and_exits_with_one_line(tmp_path, sig, code):
    out = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "fastsam2.export.cli", *ARGS, "--prompts", "cyclist",
                          "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 600  # a bound, not a speed: the folder appears once the models are built
        while not hidden_left(tmp_path, "b"):
            assert p.poll() is None, f"export ended before writing: {p.communicate()}"
            assert time.monotonic() < deadline, "the export's temp folder never appeared"
            time.sleep(0.05)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == code, stderr
    lines = stderr.strip().splitlines()
    errors = [s for s in lines if s.startswith("error:")]
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert errors == [lines[-1]] and f"interrupted by {name}" in lines[-1], stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr and stdout == ""
    # the random-weights warning came first, before the export started writing
    assert lines[0].startswith("warning: no SAM2 checkpoint given"), stderr
    assert hidden_left(tmp_path, "b") == [] and not out.exists()
