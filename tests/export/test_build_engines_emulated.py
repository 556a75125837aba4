"""fastsam2-export's local engine build, end to end on an emulated device (no GPU in CI).

`build_engines`, the export hook that decides plan-or-build, the manifest it writes and the
runtime that loads the result run for real; CUDA and the `tensorrt` module are emulated (see
tests/trt_emulation.py): the emulated builder records the flags, pools and optimisation profiles
it is given and serialises engines that compute with onnxruntime.
"""

from __future__ import annotations

from importlib import resources

import pytest

pytest.importorskip("polygraphy")

import trt_emulation as emu  # noqa: E402
from conftest import export_tiny_bundle  # noqa: E402
from fastsam2.profiles import load_profile  # noqa: E402
from fastsam2.runtime.bundle import load_bundle, sha256_file  # noqa: E402
from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, dynamic_inputs  # noqa: E402
from fastsam2.runtime.errors import BundleError  # noqa: E402
from fastsam2.runtime.track import PromptSpec, track  # noqa: E402


def test_export_builds_engines_for_this_gpu_and_run_uses_them(monkeypatch, tmp_path, synth):
    engines, builds = emu.install(monkeypatch)  # an emulated sm 9.0 GPU: the hopper profile's
    out = tmp_path / "b"
    m = export_tiny_bundle(out, target="hopper", keep=0.5)
    e = m["engines"]
    p = load_profile("hopper")
    assert e["built"] is True and e["gpu_name"] == "Emulated GPU" and e["tensorrt_version"] == emu.EMU_TRT
    assert e["compute_capability"] == "9.0" and e["precision"] == "fp16"
    edir = out / "engines" / "hopper"
    assert (edir / "build_plan.sh").is_file() and (edir / "timing.cache").read_bytes() == b"EMU-TIMING"
    assert "built in" in (edir / "build.log").read_text()
    for g in GRAPH_ORDER:
        f = out / e["graphs"][g]["file"]
        assert f.parent == edir and f.name == f"{g}.engine" and e["graphs"][g]["sha256"] == sha256_file(f)

    # each engine was checked against its ONNX graph; the emulated engines compute with ORT
    assert sorted(e["checks"]) == sorted(GRAPH_ORDER) and all(c["passed"] for c in e["checks"].values())
    errs = [o["max_abs_err"] for c in e["checks"].values() for o in c["outputs"].values()]
    assert len(errs) == sum(len(GRAPHS[g].outputs) for g in GRAPH_ORDER) and max(errs) <= 1e-5
    assert [b["graph"] for b in builds] == list(GRAPH_ORDER)
    for b in builds:
        assert b["flags"] == {"FP16"} and b["workspace"] == p.workspace_mib << 20
        assert b["level"] == p.builder_optimization_level and b["device"] is None
        # the builder got exactly the profile the manifest (and the build plan) state
        want = {n: [tuple(s) for s in v] for n, v in e.get("profile_shapes", {}).get(b["graph"], {}).items()}
        assert b["profile"] == want and sorted(want) == sorted(dynamic_inputs(b["graph"]))

    # the runtime picks the engines by itself and tracks like ONNX Runtime does
    prompt = PromptSpec(points=[synth.first_frame_points[1]])
    res = track(synth.frames_dir_or_file, out, prompt, tmp_path / "r", backend="auto", overlay=False,
                max_frames=9, warn=lambda _: None)
    ref = track(synth.frames_dir_or_file, out, prompt, tmp_path / "r2", backend="ort-cpu", overlay=False,
                max_frames=9, warn=lambda _: None)
    # five engines loaded by the export's checks, five by the run
    assert res["backend"] == "tensorrt" and len(engines) == 2 * len(GRAPH_ORDER)
    assert [f["mask_area"] for f in res["frames"]] == [f["mask_area"] for f in ref["frames"]]
    assert load_bundle(out).manifest["engines"]["built"] is True  # the bundle still verifies


def test_dla_target_builds_on_dla_with_gpu_fallback(monkeypatch, tmp_path):
    _, builds = emu.install(monkeypatch, gpu={"gpu_name": "Orin (nvgpu)", "compute_capability": "8.7"})
    m = export_tiny_bundle(tmp_path / "b", target="jetson-orin", keep=0.5)
    assert m["engines"]["built"] is True and m["engines"]["dla_core"] == 0
    assert all(b["device"] == "DLA" and b["dla_core"] == 0 and "GPU_FALLBACK" in b["flags"] for b in builds)


def test_other_gpu_gets_the_plan_only(monkeypatch, tmp_path):
    _, builds = emu.install(monkeypatch)  # sm 9.0 here; jetson-orin is sm 8.7
    m = export_tiny_bundle(tmp_path / "b", target="jetson-orin", keep=0.5)
    assert m["engines"]["built"] is False and builds == []
    assert (tmp_path / "b" / "engines" / "jetson-orin" / "build_plan.sh").is_file()


def test_int8_without_calibration_cache_fails_cleanly(monkeypatch, tmp_path):
    emu.install(monkeypatch)
    src = tmp_path / "hopper-int8.toml"  # a custom target: --target accepts a TOML path
    text = resources.files("fastsam2.profiles").joinpath("hopper.toml").read_text()
    src.write_text(text.replace('precision = "fp16"', 'precision = "int8"'))
    out = tmp_path / "b"
    with pytest.raises(BundleError, match=r"int8 needs a calibration cache at .*calibration_image_encoder\.cache"):
        export_tiny_bundle(out, target=str(src), keep=0.5)
    assert not out.exists() and not list(tmp_path.glob("b*"))  # nothing half-written


def test_engine_that_differs_from_onnx_is_reported(monkeypatch, tmp_path):
    """An engine whose numbers drift (here: the emulated router engine adds 0.5 to its outputs)
    is built and recorded, with a failed check in the manifest and one warning line."""
    import warnings

    from fastsam2.export.cli import export_bundle

    emu.install(monkeypatch)
    monkeypatch.setattr(emu, "PERTURB", {"router": 0.5})
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = export_bundle(target="hopper", keep=0.5, prompts="cyclist", text_pretrained="random",
                          image_size=256, out=str(tmp_path / "b"), log=said.append)
    checks = m["engines"]["checks"]
    assert m["engines"]["built"] is True and checks["router"]["passed"] is False
    assert all(checks[g]["passed"] for g in GRAPH_ORDER if g != "router")
    assert checks["router"]["outputs"]["scores"]["max_abs_err"] == pytest.approx(0.5, abs=1e-4)
    warned = [s for s in said if s.startswith("warning: router engine differs")]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "engine checks vs ONNX Runtime: 4/5 within tolerance" in said
