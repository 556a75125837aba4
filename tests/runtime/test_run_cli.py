"""fastsam2-run as users run it: the spine on ORT CPU, mp4 + overlay + results.json, and every
bad input of the issue (one line, exit code 2, nothing half-written)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import NUM_FRAMES, mask_iou
from fastsam2.runtime.bundle import reseal
from fastsam2.runtime.outputs import read_palette_png
from fastsam2.runtime.run_cli import main


def run(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def test_parity_run_cli_keep1_matches_official_masks(bundle_dir, synth, official_logits, tmp_path):
    x, y = synth.first_frame_points[1]
    out = tmp_path / "r"
    code, text = run([synth.frames_dir_or_file, "--prompt", "cyclist", "--bundle", bundle_dir,
                      "--point", f"{x},{y}", "--keep", "1.0", "--backend", "ort-cpu", "--out", out, "--quiet"])
    assert code == 0, text
    assert len(text.strip().splitlines()) == 1 and f"{NUM_FRAMES} frames" in text  # --quiet: the summary only
    ious = []
    for i, logits in official_logits.items():
        ours = read_palette_png(out / "masks" / f"{i:05d}.png")
        assert ours.shape == (synth.height, synth.width)
        assert set(np.unique(ours)) <= {0, 1}
        ious.append(mask_iou(ours == 1, logits > 0))
    assert len(ious) == NUM_FRAMES and min(ious) >= 0.999, ious
    res = json.loads((out / "results.json").read_text())
    assert [f["kept_tokens"] for f in res["frames"]] == [256] * NUM_FRAMES


def test_mp4_with_overlay_and_results(bundle_dir, tmp_path):
    import av

    from fastsam2.calibration.synthetic import make_video

    vid = make_video(tmp_path / "v", num_frames=9, size=(120, 160), seed=5, fmt="mp4")
    out = tmp_path / "r"
    code, text = run([vid.frames_dir_or_file, "--bundle", bundle_dir, "--prompt", "red ball",
                      "--keep", "0.5", "--backend", "ort-cpu", "--out", out])
    assert code == 0, text
    assert "warning:" in text and "untrained" in text  # the router/text state is said, not hidden
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{i:05d}.png" for i in range(9)]
    with av.open(str(out / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
    res = json.loads((out / "results.json").read_text())
    [start] = res["prompts"]
    assert start["start"]["source"] == "text" and start["text"] == "red ball" and start["frame"] == 0
    x, y = start["start"]["point"]
    assert 0 <= x < 160 and 0 <= y < 120
    assert res["k"] == 128 and res["tokens"] == 256
    f = res["frames"]
    assert len(f) == 9 and f[0]["kept_tokens"] == 256 and all(r["kept_tokens"] == 128 for r in f[1:])
    for r in f:
        assert {"object_score", "mask_area", "bbox"} <= set(r["objects"]["1"]) and "latency_ms" in r
        assert set(r["latency_ms"]) >= {"image_encoder", "mask_decoder", "memory_encoder"}
        mask = read_palette_png(out / "masks" / f"{r['frame']:05d}.png")
        assert int((mask > 0).sum()) == r["mask_area"] == r["objects"]["1"]["mask_area"]
    assert "router" in f[1]["latency_ms"] and "memory_attention" in f[1]["latency_ms"]
    assert res["bundle"]["config"] == "sam2.1_hiera_t" and res["totals"]["fps"] > 0


def _copy_bundle(src, dst):
    """A cheap copy: hard links, so tests can change one file without touching the fixture."""
    dst.mkdir()
    for p in src.iterdir():
        os.link(p, dst / p.name)
    return dst


def _replace(path, data: bytes):
    path.unlink()  # break the hard link before writing
    path.write_bytes(data)


@pytest.fixture()
def frames(synth):
    return synth.frames_dir_or_file


def bad(args, tmp_path, message):
    out = tmp_path / "r"
    code, text = run(args + ["--out", out, "--quiet"])
    assert code == 2, text
    assert text.startswith("error: ") and message in text, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    return out


def test_bad_video_inputs(bundle_dir, tmp_path):
    b = ["--bundle", bundle_dir, "--prompt", "cyclist", "--point", "10,10"]
    bad([tmp_path / "nope.mp4"] + b, tmp_path, "no such file")
    corrupt = tmp_path / "c.mp4"
    corrupt.write_bytes(os.urandom(4096))
    bad([corrupt] + b, tmp_path, "cannot open video")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad([empty] + b, tmp_path, "no .jpg/.jpeg/.png frames")


def test_zero_frame_video(bundle_dir, tmp_path):
    from test_video_io import _empty_video

    path = tmp_path / "zero.avi"
    _empty_video(path, "avi")  # a video stream with 0 frames
    bad([path, "--bundle", bundle_dir, "--prompt", "cyclist", "--point", "1,1"], tmp_path, "no decodable frames")


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "dog"], "not in the bundle"),
    (["--prompt", "cyclist", "--point", "400,10"], "outside"),
    (["--prompt", "cyclist", "--box", "10,10,5,50"], "x0 < x1"),
    (["--prompt", "cyclist", "--point", "1;2"], "--point"),
    (["--prompt", "cyclist", "--keep", "0"], "--keep"),
    (["--prompt", "cyclist", "--keep", "1.2"], "--keep"),
    (["--prompt", "cyclist", "--max-frames", "0"], "--max-frames"),
])
def test_bad_prompt_and_keep(bundle_dir, frames, tmp_path, extra, message):
    bad([frames, "--bundle", bundle_dir] + extra, tmp_path, message)


def test_changed_bundle_and_other_version_are_refused(bundle_dir, frames, tmp_path):
    b = _copy_bundle(bundle_dir, tmp_path / "b")
    data = bytearray((bundle_dir / "memory_encoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    _replace(b / "memory_encoder.onnx", bytes(data))
    bad([frames, "--bundle", b, "--prompt", "cyclist"], tmp_path, "changed since export")
    b2 = _copy_bundle(bundle_dir, tmp_path / "b2")
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["fastsam2_version"] = "0.0.1"
    _replace(b2 / "manifest.json", json.dumps(m).encode())
    bad([frames, "--bundle", b2, "--prompt", "cyclist"], tmp_path, "exported by fastsam2 0.0.1")
    bad([frames, "--bundle", tmp_path / "nobundle", "--prompt", "cyclist"], tmp_path, "bundle folder not found")


def test_engine_keep_range_refused(bundle_dir, frames, tmp_path):
    b = _copy_bundle(bundle_dir, tmp_path / "b")
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["engines"] = {"keep_range": [0.3, 1.0], "built": False}
    _replace(b / "manifest.json", json.dumps(m).encode())
    reseal(b)  # a deliberate edit: the seal would refuse the bundle first
    bad([frames, "--bundle", b, "--prompt", "cyclist", "--keep", "0.2"], tmp_path, "profile range")


def test_unwritable_output(bundle_dir, frames, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = run([frames, "--bundle", bundle_dir, "--prompt", "cyclist", "--out", blocker / "r", "--quiet"])
    assert code == 2 and text.startswith("error: cannot") and "Traceback" not in text


def test_corrupt_frame_midway_keeps_finished_masks_valid(bundle_dir, synth, tmp_path):
    src = synth.frames_dir_or_file
    frames = tmp_path / "frames"
    shutil.copytree(src, frames)
    (frames / "00005.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "r"
    code, text = run([frames, "--bundle", bundle_dir, "--prompt", "cyclist", "--point", "150,100",
                      "--backend", "ort-cpu", "--out", out, "--quiet"])
    assert code == 2 and "00005" in text and "Traceback" not in text
    done = sorted((out / "masks").iterdir())
    assert [p.name for p in done] == [f"{i:05d}.png" for i in range(5)]
    for p in done:
        assert read_palette_png(p).shape == (synth.height, synth.width)
    assert not list(out.rglob(".*.tmp*")) and not list(out.rglob(".overlay*"))
    # the outputs of the frames done are complete: results.json says how the run ended
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and "00005" in res["error"] and len(res["frames"]) == 5
    import av

    with av.open(str(out / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5
