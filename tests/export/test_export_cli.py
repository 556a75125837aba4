"""fastsam2-export as users run it: official-format checkpoints, targets, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from conftest import export_tiny_bundle
from fastsam2.export.cli import main
from fastsam2.export.sam2_loader import load_sam2
from fastsam2.runtime.errors import CheckpointError

BASE = ["--config", "sam2.1_hiera_t", "--target", "cpu", "--keep", "1.0", "--prompts", "cyclist",
        "--text-pretrained", "random", "--image-size", "256", "--precision", "fp32"]


def run(args):
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory, tiny_sam2):
    """A checkpoint in the official format: {"model": state_dict}, loadable with weights_only."""
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": tiny_sam2.model.state_dict()}, path)
    return path


def test_official_checkpoint_loads_with_weights_only(official_ckpt, tiny_sam2):
    loaded = load_sam2("sam2.1_hiera_t", str(official_ckpt), image_size=256, seed=123)
    a, b = loaded.model.state_dict(), tiny_sam2.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)  # seed 123 would differ: weights came from the file
    assert loaded.checkpoint_sha256 and len(loaded.checkpoint_sha256) == 64


def test_checkpoint_mismatch_names_first_key(tmp_path, tiny_sam2):
    sd = dict(tiny_sam2.model.state_dict())
    sd.pop("no_mem_embed")
    path = tmp_path / "bad.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="no_mem_embed"):
        load_sam2("sam2.1_hiera_t", str(path), image_size=256)
    # a small model's checkpoint against a bigger config: shape mismatch, one line
    code, out = run(BASE[:1] + ["sam2.1_hiera_s"] + BASE[2:] + ["--checkpoint", str(path), "--out", str(tmp_path / "o")])
    assert code == 2 and out.startswith("error: checkpoint") and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_export_with_official_checkpoint_records_sha(tmp_path, official_ckpt):
    """An official-format checkpoint and prompts from a file alone (no --prompts), exported with
    --force over an earlier bundle: replaced whole (tests/export/test_export_hostile.py: what
    --force refuses to replace)."""
    from fastsam2.export.sam2_loader import sha256_file

    out = tmp_path / "b"
    out.mkdir()
    (out / "image_encoder.onnx").write_bytes(b"an earlier export's graph")
    (out / "stale_ort.onnx").write_bytes(b"a graph this export does not write")
    (out / "manifest.json").write_text(json.dumps({
        "format": 1, "fastsam2_version": "0.0.1", "graphs": {},
        "seal": {"format": 1, "files": {"image_encoder.onnx": "0" * 64, "stale_ort.onnx": "0" * 64},
                 "sha256": "0" * 64}}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# what to track\ncyclist\n\nred ball\n")
    args = [a for a in BASE if a not in ("--prompts", "cyclist")]
    code, text = run(args + ["--prompts-file", str(prompts), "--checkpoint", str(official_ckpt),
                             "--out", str(out), "--force"])
    assert code == 0, text
    said = text.splitlines()  # the progress lines as they always were: plain, after the warnings
    assert said[0].startswith("warning: text encoder ViT-B-32 is randomly initialised"), said
    assert said[1].startswith("exported image_encoder: ") and said[-1].startswith("wrote bundle "), said
    assert not [s for s in said if s.startswith(("INFO", "WARNING", "fastsam2."))], said
    assert not (out / "stale_ort.onnx").exists()  # --force replaced the earlier bundle whole
    assert (out / "image_encoder.onnx").read_bytes() != b"an earlier export's graph"
    assert not list(tmp_path.glob(".b.*"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["checkpoint"]["sha256"] == sha256_file(str(official_ckpt)) and m["weights_random"] is False
    assert m["prompts"] == ["cyclist", "red ball"]
    assert "NOT meaningful" not in text  # no random-weights warning with a checkpoint


def test_jetson_target_writes_build_plan(tmp_path):
    out = tmp_path / "bj"
    m = export_tiny_bundle(out, target="jetson-orin", keep=0.5)
    plan = out / "engines" / "jetson-orin" / "build_plan.sh"
    assert plan.is_file() and os.access(plan, os.X_OK)
    assert m["engines"]["built"] is False and m["engines"]["build_plan"] == "engines/jetson-orin/build_plan.sh"
    text = plan.read_text()
    assert text.count("--saveEngine=") == 5 and "--useDLACore=0" in text
    assert "memory_attention.onnx" in text
    # the runtime's ONNX Runtime TensorRT provider builds with the plan's own profiles
    from fastsam2.export.tensorrt import shape_profiles
    from fastsam2.profiles import load_profile

    shapes = shape_profiles(load_profile("jetson-orin"), 256, 0.5)
    ps = m["engines"]["profile_shapes"]
    # every graph with a dynamic axis: the objects (B) of router, decoder and memory encoder too
    assert sorted(ps) == ["mask_decoder", "memory_attention", "memory_encoder", "router"]
    assert ps["memory_attention"]["curr"] == [list(x) for x in shapes["memory_attention"]["curr"]]
    n_min, n_opt, n_max = (ps["memory_attention"]["curr"][i][0] for i in range(3))
    assert f"--minShapes=curr:{n_min}x256" in text and f"--optShapes=curr:{n_opt}x256" in text
    assert f"--maxShapes=curr:{n_max}x256" in text


def test_list_targets():
    code, out = run(["--list-targets"])
    assert code == 0
    for t in ("jetson-orin", "jetson-orin-nano", "desktop-ampere", "desktop-ada", "hopper", "cpu"):
        assert t in out


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "--keep must be in (0, 1]"),
    (["--keep", "1.5"], "--keep must be in (0, 1]"),
    (["--keep", "half"], "--keep must be a number"),
    (["--prompts", " , "], "prompt"),
    (["--target", "jetson-xavier"], "unknown target"),
    (["--checkpoint", "missing.pt"], "checkpoint not found"),
    (["--config", "sam3_hiera_t"], "unknown SAM2 config"),
])
def test_bad_input_one_line_no_traceback(tmp_path, args, message):
    out = tmp_path / "o"
    code, text = run(BASE + args + ["--out", str(out)])
    assert code == 2, text
    assert text.startswith("error: ") and message in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "c.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, text = run(BASE + ["--checkpoint", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and text.startswith("error: cannot read checkpoint") and "Traceback" not in text


def _one_line_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def pickled_object_file(tmp_path_factory):
    """A .pt whose pickle holds an object beyond tensors and plain containers: torch.load with
    weights_only refuses it with advice to turn weights_only off, which we must not repeat."""
    import fractions

    path = tmp_path_factory.mktemp("pickled") / "odd.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "ratio": fractions.Fraction(1, 3)}, path)
    return path


def test_checkpoint_and_router_errors_do_not_repeat_torchs_advice(tmp_path, pickled_object_file):
    from fastsam2.calibration.router_training import load_router
    from fastsam2.runtime.cli_edge import one_line

    code, text = run(BASE + ["--checkpoint", str(pickled_object_file), "--out", str(tmp_path / "o")])
    line = _one_line_error(text)
    assert code == 2 and line.startswith("error: cannot read checkpoint") and not (tmp_path / "o").exists()
    # --router-weights fails the same way after minutes of model loading: its message, as the
    # CLIs print it (fastsam2-export and fastsam2-calibrate both print one_line(error))
    with pytest.raises(CheckpointError) as e:
        load_router(pickled_object_file, 512)
    router_line = one_line(e.value)
    assert router_line.startswith("cannot read router weights")
    for said in (line, router_line):
        assert "Python objects besides tensors" in said, said
        for advice in ("weights_only", "trust", "arbitrary code", "\x1b["):
            assert advice not in said, said


# a runtime-only install: importing torch fails as it does where it is not installed
NO_TORCH = textwrap.dedent("""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    module, *args = sys.argv[1:]
    __import__(module, fromlist=["main"]).main(args)
""")


@pytest.mark.parametrize("module, args, words", [
    ("fastsam2.export.cli", ["--target", "cpu", "--out", "{tmp}/b"], ["fastsam2-export needs the export extra"]),
    ("fastsam2.calibration.calibrate_cli", ["router", "--frames", "{tmp}/f", "--prompt", "ball"],
     ["fastsam2-calibrate router needs the export extra"]),
])
def test_runtime_only_install_names_the_extra(tmp_path, module, args, words):
    args = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-c", NO_TORCH, module, *args], capture_output=True, text=True,
                       timeout=120)
    line = _one_line_error(r.stderr)
    assert r.returncode == 2 and r.stdout == ""
    assert 'pip install "fastsam2[export]"' in line and "torch" in line, line
    for w in words:
        assert w in line
    assert list(tmp_path.iterdir()) == []


def test_calibrate_int8_needs_no_torch(tmp_path):
    """int8 recording runs on the runtime: without torch it reaches the bundle check."""
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "fastsam2.calibration.calibrate_cli", "int8", "--bundle",
                        str(tmp_path / "nope"), "--frames", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and _one_line_error(r.stderr).startswith("error: bundle folder not found")


def test_existing_output_needs_force_and_unwritable_output(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = run(BASE + ["--out", str(out)])
    assert code == 2 and "exists" in text and "--force" in text
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = run(BASE + ["--out", str(blocker / "sub" / "b")])
    assert code == 2 and text.startswith("error: cannot") and "Traceback" not in text


def test_keep_auto_export_covers_the_profile_range(tmp_path):
    out = tmp_path / "ba"
    m = export_tiny_bundle(out, target="desktop-ada", keep="auto")
    assert m["keep"] == "auto" and m["k"] is None
    assert m["engines"]["keep_range"] == [0.3, 1.0]
    plan = (out / m["engines"]["build_plan"]).read_text()
    # N spans keep_min..keep_max of the 256 tokens: 77..256, optimised at the middle (0.65 -> 167)
    assert "curr:77x256" in plan and "curr:256x256" in plan and "curr:167x256" in plan
