"""fastsam2-run against a hostile user (issue 20): --force never removes a file fastsam2 did not
write, and no flag or prompts file makes it trace back: one `error:` line, exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from conftest import own_bundle
from fastsam2.runtime.bundle import reseal
from fastsam2.runtime.prompt_flags import MAX_PROMPTS_FILE
from fastsam2.runtime.run_cli import main
from fastsam2.runtime.run_folder import RECORD_NAME

HUGE = "1" * 5000  # past Python's 4300-digit limit of int()


def run(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def bad(args, message):
    code, text = run(args + ["--quiet"])
    assert code == 2, text
    assert text.startswith("error: ") and message in text, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert len(text) < 600, text  # a 5000-digit value is not repeated whole (click's parse errors too)
    return text


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from fastsam2.calibration.synthetic import make_video

    return make_video(tmp_path_factory.mktemp("small"), num_frames=3, size=(96, 128), seed=3, fmt="jpg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- --force and the files of others ----------------------------------------------------------
def test_force_replaces_only_what_the_last_run_recorded(bundle_dir, small, tmp_path):
    args = [small.frames_dir_or_file, "--bundle", bundle_dir, "--point", "40,40", "--backend", "ort-cpu",
            "--max-frames", "2"]
    out = tmp_path / "r"
    assert run(args + ["--out", out, "--quiet"])[0] == 0
    record = json.loads((out / RECORD_NAME).read_text())
    assert sorted(record["files"]) == ["masks/00000.png", "masks/00001.png", "overlay.mp4", "results.json"]
    (out / "notes.txt").write_text("mine")
    bad(args + ["--out", out], "earlier run's outputs")
    code, text = run(args + ["--out", out, "--force", "--quiet"])  # our own outputs: replaced
    assert code == 0, text
    assert json.loads((out / "results.json").read_text())["status"] == "finished"
    assert (out / "notes.txt").read_text() == "mine"

    # the user changed our results.json since: it is theirs now
    (out / "results.json").write_text('{"my": "analysis"}')
    bad(args + ["--out", out, "--force"], f"{out / 'results.json'} has changed since fastsam2 wrote it")
    assert (out / "results.json").read_text() == '{"my": "analysis"}'
    assert (out / "masks" / "00000.png").exists() and (out / "overlay.mp4").exists()  # nothing removed


@pytest.mark.parametrize("name", ["results.json", "overlay.mp4", "masks/00000.png"])
def test_force_never_touches_a_users_file_of_an_output_name(bundle_dir, small, tmp_path, name):
    out = tmp_path / "r"
    mine = out / name
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's own file")
    args = [small.frames_dir_or_file, "--bundle", bundle_dir, "--point", "40,40", "--backend", "ort-cpu",
            "--max-frames", "2", "--out", out]
    for extra in ([], ["--force"]):
        bad(args + extra, f"{mine} was not written by fastsam2")
        assert mine.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in out.iterdir()) == [name.split("/")[0]]  # no record, no other output


# -- flags ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "1e12", "nan", "-1", "0", "3601"])
def test_timeout_out_of_range_on_a_live_url(bundle_dir, tmp_path, value):
    url = f"http://127.0.0.1:{_free_port()}/stream.mjpg"  # never opened: the flag is refused first
    bad([url, "--bundle", bundle_dir, "--point", "10,10", f"--timeout={value}", "--out", tmp_path / "r"],
        "--timeout must be a number of seconds in (0, 3600]")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--point", f"10,10@{HUGE}"], "is past the last frame"),
    (["--point", f"{HUGE}:10,10"], "object id"),
    (["--point", "10,10", "--remove", f"1@{HUGE}"], "is past the last frame"),
    (["--point", "10,10", "--remove", f"{HUGE}@1"], "object id"),
    (["--box", f"1:10,10,20,20@{'9' * 400}"], "is past the last frame"),
    (["--point", "10,10", "--max-frames", HUGE], "'--max-frames': '1111"),
    (["--point", "10,10", "--max-frames", "99999999999999"], "--max-frames must be an integer in 1..2147483647"),
    (["--point", "10,10", "--duration", "inf"], "--duration must be a number of seconds"),
    (["--point", "10,10", "--duration", "nan"], "--duration must be a number of seconds"),
    (["--point", "10,10", "--duration", "1e300"], "--duration must be a number of seconds"),
    (["--point", "10,10", "--max-cond-frames", "0"], "--max-cond-frames"),
    (["--point", "10,10", "--max-cond-frames", "99999999999999999999"], "--max-cond-frames"),
    (["--point", "10,10", "--max-cond-frames", "1000000"], "is not in the range 1<=x<=64"),
    (["--point", "10,10", "--threads", HUGE], "--threads"),
])
def test_absurd_numbers_are_one_line(bundle_dir, small, tmp_path, flags, message):
    out = tmp_path / "r"
    bad([small.frames_dir_or_file, "--bundle", bundle_dir, "--backend", "ort-cpu", "--out", out] + flags, message)
    assert not out.exists()


# -- the prompts file -------------------------------------------------------------------------
@pytest.mark.parametrize("entry, message", [
    ({"points": [[int("1" + "0" * 400), 5]]}, "each entry must be 2 numbers"),
    ({"points": [[5, 5]], "frame": int("9" * 400)}, '"frame" must be an integer in 0..'),
    ({"points": [[5, 5]], "object": int("9" * 400)}, "object id"),
])
def test_prompts_file_with_huge_integers(bundle_dir, small, tmp_path, entry, message):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"prompts": [entry]}))
    bad([small.frames_dir_or_file, "--bundle", bundle_dir, "--prompts-file", f, "--out", tmp_path / "r"], message)


def test_many_small_prompts_for_one_object_and_frame_are_refused_as_one(bundle_dir, small, tmp_path):
    """The per-entry cap is not enough: entries for one object and frame merge into one prompt."""
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"prompts": [{"points": [[5, 5]]}] + [{"frame": 2, "points": [[5, 5]]}] * 100000}))
    assert f.stat().st_size < MAX_PROMPTS_FILE
    bad([small.frames_dir_or_file, "--bundle", bundle_dir, "--prompts-file", f, "--out", tmp_path / "r"],
        "object 1 on frame 2 has 100000 clicks")
    assert not (tmp_path / "r").exists()


def test_prompts_file_from_a_fifo_reads_only_up_to_the_cap(bundle_dir, small, tmp_path):
    """A FIFO has no size to check (stat says 0): the cap bounds what is read."""
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)

    def feed():
        try:
            with open(fifo, "wb") as f:
                f.write(b"{" + b" " * (MAX_PROMPTS_FILE + 1024))
        except BrokenPipeError:
            pass  # the reader stopped at the cap, as it should

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        bad([small.frames_dir_or_file, "--bundle", bundle_dir, "--prompts-file", fifo, "--out", tmp_path / "r"],
            "is larger than 4 MB")
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # a writer still waiting to open is released
        writer.join(timeout=30)
    assert not writer.is_alive()


def test_prompts_file_dev_zero_is_refused_at_the_cap():
    """/dev/zero never ends: read under a 3 GiB address-space limit, so a regression fails
    with MemoryError instead of taking the machine's memory."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "from fastsam2.runtime.errors import InputError\n"
            "from fastsam2.runtime.prompt_flags import schedule_from_file\n"
            "try:\n    schedule_from_file('/dev/zero')\nexcept InputError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "prompts file /dev/zero is larger than 4 MB", p.stderr[-2000:]


# -- keep -> k and the backend, resolved once (issue 21) ----------------------------------------
def test_k_follows_the_bundles_keep_floor(bundle_dir, small, tmp_path):
    b = own_bundle(bundle_dir, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["keep_floor"] = 200  # of 256 tokens: keep 0.5 keeps 200, not 128
    (b / "manifest.json").unlink()
    (b / "manifest.json").write_text(json.dumps(m))
    reseal(b)
    out = tmp_path / "r"
    code, text = run([small.frames_dir_or_file, "--bundle", b, "--point", "40,40", "--keep", "0.5",
                      "--backend", "ort-cpu", "--no-overlay", "--out", out, "--quiet"])
    assert code == 0, text
    res = json.loads((out / "results.json").read_text())
    assert res["k"] == 200 and [f["kept_tokens"] for f in res["frames"]] == [256, 200, 200]


def test_the_backend_is_resolved_once_per_run(bundle_dir, small, tmp_path, monkeypatch):
    from fastsam2.runtime import backends

    calls = []
    real = backends._candidates
    monkeypatch.setattr(backends, "_candidates", lambda *a: calls.append(a[0]) or real(*a))
    code, text = run([small.frames_dir_or_file, "--bundle", bundle_dir, "--point", "40,40",
                      "--backend", "auto", "--no-overlay", "--max-frames", "1", "--out", tmp_path / "r"])
    assert code == 0, text
    assert calls == ["auto"] and "backend: ort-cpu (auto)" in text


# -- signals (cli_edge.cli_errors) ---------------------------------------------------------------
CHILD = ("import signal, sys\n"
         # as from a terminal: a suite run in the background hands its children SIGINT ignored
         "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
         "from fastsam2.runtime.run_cli import main\n"
         "main(prog_name='fastsam2-run')\n")


@pytest.mark.parametrize("sig, code, words", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_mid_run_is_one_line_and_the_run_records_its_outputs(bundle_dir, tmp_path, sig, code, words):
    from fastsam2.calibration.synthetic import make_video

    vid = make_video(tmp_path / "v", num_frames=60, size=(96, 128), seed=2, fmt="jpg")
    out = tmp_path / "r"
    args = [vid.frames_dir_or_file, "--bundle", bundle_dir, "--point", "40,40", "--backend", "ort-cpu",
            "--threads", "1", "--out", out]
    p = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args), "--quiet"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # a bound on a loaded machine, not a speed assertion
        while not (out / "masks" / "00001.png").exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted by") and words in lines[0], err
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "interrupted" and 1 <= len(res["frames"]) < 60
    masks = [f"masks/{p.name}" for p in sorted((out / "masks").iterdir())]
    assert masks == [f"masks/{f['frame']:05d}.png" for f in res["frames"]]  # a mask per frame recorded, no more
    recorded = json.loads((out / RECORD_NAME).read_text())["files"]
    assert sorted(recorded) == masks + ["overlay.mp4", "results.json"]
    # what the stopped run wrote is its own: --force replaces it
    code, text = run(args + ["--max-frames", "1", "--force", "--quiet"])
    assert code == 0, text
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00000.png"]
