"""Outputs belong to one run: strict JSON, a locked output folder, an earlier run's outputs
refused or replaced whole, no empty masks/ after an early error, and signals that clean up."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from fastsam2.runtime.errors import InputError, OutputError
from fastsam2.runtime.outputs import RunFolder, atomic_write_json, finite_or_none, write_palette_png
from fastsam2.runtime.run_folder import LOCK_NAME


def strict_load(path):
    def refuse(name):
        raise ValueError(f"{name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_json_is_strict_and_non_finite_maps_to_null(tmp_path):
    assert [finite_or_none(v) for v in (float("nan"), float("inf"), -math.inf, None)] == [None] * 4
    assert finite_or_none(np.float32(0.123456), 3) == 0.123 and finite_or_none(2) == 2.0
    bad = {"frames": [{"iou": 0.9}, {"iou": float("nan")}]}
    with pytest.raises(ValueError, match=r"frames\[1\]\.iou"):
        atomic_write_json(tmp_path / "results.json", bad)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file
    bad["frames"][1]["iou"] = finite_or_none(bad["frames"][1]["iou"])
    atomic_write_json(tmp_path / "results.json", bad)
    assert strict_load(tmp_path / "results.json")["frames"][1]["iou"] is None


def test_a_run_locks_its_folder_and_makes_masks_on_the_first_mask(tmp_path):
    out = tmp_path / "r"
    with RunFolder(out) as run:
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert not (out / "masks").exists()  # nothing written yet
        with pytest.raises(OutputError, match=r"in use by another fastsam2 run \(pid \d+\)"):
            RunFolder(out).__enter__()
        write_palette_png(run.mask_path(0), np.ones((4, 6), np.uint8))
        assert (out / "masks" / "00000.png").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["masks"]  # the lock is gone
    with RunFolder(out, force=True):  # and the folder can be taken again
        pass


def test_an_early_error_leaves_no_empty_folders(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(InputError):
        with RunFolder(out) as run:
            run.subfolder("masks")
            raise InputError("bad prompt")
    assert not out.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(InputError):
        with RunFolder(existing):
            raise InputError("bad prompt")
    assert existing.is_dir() and list(existing.iterdir()) == []  # the user's folder stays


def _earlier_run(out):
    (out / "masks").mkdir(parents=True)
    for i in range(5):
        (out / "masks" / f"{i:05d}.png").write_bytes(b"old")
    (out / "masks" / "notes.txt").write_text("mine")
    (out / "masks" / ".00003.png.k2j4h5g6.tmp").write_bytes(b"half")
    (out / "overlay.mp4").write_bytes(b"old")
    (out / ".overlay.mp4.abcd_123.mp4").write_bytes(b"half")  # left by a killed run
    (out / "results.json").write_text("{}")
    (out / "keep.txt").write_text("mine")
    (out / ".myconfig").write_text("mine")


def test_earlier_outputs_refused_without_force_and_replaced_whole_with_it(tmp_path):
    out = tmp_path / "r"
    _earlier_run(out)
    with pytest.raises(OutputError) as e:
        RunFolder(out).__enter__()
    assert "earlier run's outputs (masks/, overlay.mp4, results.json)" in str(e.value) and "--force" in str(e.value)
    assert (out / "results.json").exists() and len(list((out / "masks").glob("*.png"))) == 5
    assert not (out / LOCK_NAME).exists()
    # temp files of a killed run are never outputs: removed under the lock either way
    assert not (out / ".overlay.mp4.abcd_123.mp4").exists() and not (out / "masks" / ".00003.png.k2j4h5g6.tmp").exists()

    with RunFolder(out, force=True) as run:
        assert run.replaced == ["masks", "overlay.mp4", "results.json"]
        assert not (out / "results.json").exists() and not (out / "overlay.mp4").exists()
        assert sorted(p.name for p in (out / "masks").iterdir()) == ["notes.txt"]  # the user's file stays
        write_palette_png(run.mask_path(0), np.zeros((2, 2), np.uint8))
    assert sorted(p.name for p in out.iterdir()) == [".myconfig", "keep.txt", "masks"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00000.png", "notes.txt"]


CHILD = textwrap.dedent("""
    import signal, sys, time
    import numpy as np
    # as started from a terminal: a suite run in the background (nohup, `&`) hands its children
    # SIGINT ignored, and Python then installs no Ctrl-C handler (the Unix rule for background jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from fastsam2.runtime.cli_edge import cli_interrupts
    from fastsam2.runtime.outputs import OverlayWriter, RunFolder, write_palette_png

    with cli_interrupts():
        with RunFolder(sys.argv[1]) as run:
            with OverlayWriter(run.file("overlay.mp4"), 64, 48, 10.0) as video:
                for i in range(3):
                    m = np.zeros((48, 64), np.uint8)
                    m[10:20, 10:30] = 1
                    write_palette_png(run.mask_path(i), m)
                    video.write(np.full((48, 64, 3), 90, np.uint8), m)
                print("ready", flush=True)
                time.sleep(120)
""")


@pytest.mark.parametrize("sig, code, words", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_mid_run_removes_temp_files_and_exits_128_plus_n(tmp_path, sig, code, words):
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        hidden = sorted(f.name for f in out.iterdir() if f.name.startswith("."))
        assert LOCK_NAME in hidden and any(h.startswith(".overlay.mp4.") for h in hidden)
        with pytest.raises(OutputError, match=f"in use by another fastsam2 run \\(pid {p.pid}\\)"):
            RunFolder(out).__enter__()  # a second run, from another process
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted by") and words in lines[0], err
    # finished masks stay; the overlay's temp file, the overlay itself and the lock are gone
    assert sorted(f.name for f in out.iterdir()) == ["masks"]
    assert sorted(f.name for f in (out / "masks").iterdir()) == ["00000.png", "00001.png", "00002.png"]


def test_profile_refuses_a_folder_another_run_holds(bundle_dir, tmp_path):
    from fastsam2.runtime.profile_cli import main

    out = tmp_path / "report"
    with RunFolder(out, outputs={"report.json": None}):
        res = CliRunner().invoke(main, ["--bundle", str(bundle_dir), "--backend", "ort-cpu", "--keep", "1.0",
                                        "--warmup", "0", "--iters", "1", "--out", str(out)])
    assert res.exit_code == 2 and "in use by another fastsam2 run" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_record_mode_owns_only_what_the_last_run_wrote(tmp_path):
    """record=True (fastsam2-run): the folder's record lists what a run wrote, with size and
    mtime; force replaces those, and refuses, naming it, any file of an output's name it does
    not list (the user's own) or that changed since."""
    from fastsam2.runtime.run_folder import RECORD_NAME

    out = tmp_path / "r"
    with RunFolder(out, record=True) as run:
        write_palette_png(run.mask_path(0), np.ones((2, 2), np.uint8))
        atomic_write_json(run.file("results.json"), {"status": "finished"})
    files = json.loads((out / RECORD_NAME).read_text())["files"]
    assert sorted(files) == ["masks/00000.png", "results.json"]
    assert files["results.json"] == [(out / "results.json").stat().st_size, (out / "results.json").stat().st_mtime_ns]

    (out / "overlay.mp4").write_bytes(b"the user's video")  # an output's name, not in the record
    for force in (False, True):
        with pytest.raises(OutputError, match=r"r/overlay.mp4 was not written by fastsam2"):
            RunFolder(out, force=force, record=True).__enter__()
    assert (out / "overlay.mp4").read_bytes() == b"the user's video" and (out / "results.json").exists()
    assert not (out / LOCK_NAME).exists()
    (out / "overlay.mp4").unlink()

    with RunFolder(out, force=True, record=True) as run:  # ours: replaced, and a new record
        assert run.replaced == ["masks", "results.json"] and not (out / RECORD_NAME).exists()
        write_palette_png(run.mask_path(3), np.ones((2, 2), np.uint8))
    assert sorted(json.loads((out / RECORD_NAME).read_text())["files"]) == ["masks/00003.png"]

    (out / "masks" / "00003.png").write_bytes(b"edited")  # ours once, the user's since
    with pytest.raises(OutputError, match=r"00003.png has changed since fastsam2 wrote it"):
        RunFolder(out, force=True, record=True).__enter__()
    assert (out / "masks" / "00003.png").read_bytes() == b"edited"

    # a run that writes nothing leaves no record, and no folder it made
    fresh = tmp_path / "fresh"
    with pytest.raises(InputError):
        with RunFolder(fresh, record=True):
            raise InputError("bad prompt")
    assert not fresh.exists()
