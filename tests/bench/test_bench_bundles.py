"""bench/bundles.py: the one way bench scripts get a bundle (issue 21), and that no bench script
builds one another way or reaches into the tests' fixtures."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bundles  # noqa: E402

# a manifest as `fastsam2-export --target cpu --keep 1.0 --prompts cyclist --text-pretrained random
# --image-size 256 --precision fp32` writes it (the fields bundles.py matches on)
FP32 = {"config": "sam2.1_hiera_t", "image_size": 256, "target": "cpu", "keep": 1.0, "prompts": ["cyclist"],
        "checkpoint": {"file": None, "sha256": "random", "seed": 0}, "text": {"random": True},
        "precision": None, "precision_gate": {},
        "graphs": {g: {"outputs": [{"shape": ["B", 1]}]} for g in ("router", "mask_decoder", "memory_encoder")}}
GATED = {**FP32, "precision": {"image_encoder": "int8"}, "precision_gate": {"graphs": {"image_encoder": {}}}}


def imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_no_bench_script_builds_a_bundle_another_way(script):
    """No tests' fixtures (conftest, test_* modules), and export only through bundles.py."""
    names = imports(BENCH / script)
    assert not {n for n in names if n == "conftest" or n.split(".")[-1].startswith("test_")}, names
    if script != "bundles.py":
        text = (BENCH / script).read_text()
        assert "fastsam2.export.cli" not in names and "export_bundle" not in text, script
        assert "fastsam2.export.cli" not in text and "fastsam2-export\"" not in text, script


def test_a_matching_manifest_has_no_differences():
    want = bundles.request(256, prompts="cyclist")
    assert bundles.differences(FP32, want) == []


@pytest.mark.parametrize("change, word", [({"image_size": 1024}, "image_size"), ({"keep": 0.5}, "keep"),
                                          ({"prompts": ["object"]}, "prompts"), ({"target": "orin"}, "target"),
                                          ({"checkpoint": {"file": "x.pt", "sha256": "ab", "seed": None}}, "checkpoint"),
                                          ({"text": {"random": False}}, "text_random")])
def test_each_setting_that_differs_is_named(change, word):
    diff = bundles.differences({**FP32, **change}, bundles.request(256, prompts="cyclist"))
    assert len(diff) == 1 and diff[0].startswith(word), diff


def test_a_bundle_without_the_objects_batch_axis_is_stale():
    pytest.importorskip("fastsam2.runtime.batched")
    old = {**FP32, "graphs": {g: {"outputs": [{"shape": [1, 1]}]} for g in FP32["graphs"]}}
    assert bundles.differences(old, bundles.request(256, prompts="cyclist")) == [
        "its graphs have no objects batch axis (exported by an older fastsam2)"]


def test_gated_bundles_match_only_requests_that_gate():
    want = bundles.request(256, prompts="cyclist")
    assert "gated precision variants" in bundles.differences(GATED, want)[0]  # fp32 asked: picks would apply
    assert bundles.differences(GATED, want, gate="int8") == []  # fp32 export + gate: what precision.py makes
    assert bundles.differences(FP32, want, gate="int8") == []  # gated afterwards, not exported again
    assert "no gated" in bundles.differences(FP32, bundles.request(256, prompts="cyclist", precision="auto"))[0]


def fake_children(monkeypatch, manifest: dict):
    """bundles._child stand-in: records each command; an export writes `manifest`."""
    calls = []

    def child(args, threads, show, log):
        args = [str(a) for a in args]
        calls.append(args)
        if args[1] == "fastsam2.export.cli":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").write_text(json.dumps(manifest))

    monkeypatch.setattr(bundles, "_child", child)
    return calls


def test_ensure_bundle_exports_once_then_reuses(tmp_path, monkeypatch):
    calls = fake_children(monkeypatch, FP32)
    out = tmp_path / "b"
    assert bundles.ensure_bundle(out, 256, prompts="cyclist", log=lambda m: None) == out
    assert len(calls) == 1
    cmd = calls[0]
    for flag, value in (("--target", "cpu"), ("--keep", "1"), ("--prompts", "cyclist"), ("--image-size", "256"),
                        ("--precision", "fp32"), ("--text-pretrained", "random"), ("--out", str(out))):
        assert cmd[cmd.index(flag) + 1] == value, (flag, cmd)
    assert "--force" in cmd and "--checkpoint" not in cmd
    bundles.ensure_bundle(out, 256, prompts="cyclist", log=lambda m: None)
    assert len(calls) == 1  # matched: reused


def test_ensure_bundle_exports_again_when_settings_differ(tmp_path, monkeypatch):
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({**FP32, "image_size": 1024}))
    said = []
    calls = fake_children(monkeypatch, FP32)
    bundles.ensure_bundle(out, 256, prompts="cyclist", log=said.append)
    assert len(calls) == 1 and "--force" in calls[0]
    assert any("image_size 1024 != 256" in m for m in said)


def test_gate_runs_only_where_no_variants_are_gated(tmp_path, monkeypatch):
    calls = fake_children(monkeypatch, FP32)
    out = bundles.ensure_bundle(tmp_path / "b", 256, prompts="cyclist", gate="int8", threads=2,
                                gate_args={"gate_videos": 1, "gate_frames": 8}, log=lambda m: None)
    gate = calls[-1]
    assert gate[1] == "fastsam2.export.precision" and gate[2] == str(out)
    for flag, value in (("--precision", "int8"), ("--threads", "2"), ("--gate-videos", "1"), ("--gate-frames", "8")):
        assert gate[gate.index(flag) + 1] == value, (flag, gate)
    (out / "manifest.json").write_text(json.dumps(GATED))
    n = len(calls)
    bundles.ensure_bundle(out, 256, prompts="cyclist", gate="int8", log=lambda m: None)
    assert len(calls) == n  # gated already: neither exported nor gated again


def test_a_failing_child_is_one_message_with_its_output(tmp_path):
    with pytest.raises(SystemExit) as e:
        bundles._child(["-c", "import sys; print('the reason', file=sys.stderr); sys.exit(3)"], None, False,
                       lambda m: None)
    assert "exit 3" in str(e.value) and "the reason" in str(e.value)
