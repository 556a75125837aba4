"""fastsam2-export's local engine build, end to end on an emulated device (no GPU in CI).

`build_engines`, `check_engines`, the export hook that decides plan-or-build, the manifest it
writes and the runtime that loads the result run for real; CUDA and the `tensorrt` module are
emulated (tests/trt_emulation.py, trt_emulation_build.py): the emulated builder validates and
records the flags, pools and optimisation profiles it is given, as TensorRT 8.6 or 10.x, and
serialises engines that compute with onnxruntime. One test exports a bundle; the others build on
a copy of the session's bundle through the same export hook, which is what varies between them.
"""

from __future__ import annotations

import logging
from importlib import resources

import numpy as np
import pytest

pytest.importorskip("polygraphy")

import trt_emulation as emu  # noqa: E402
from conftest import export_tiny_bundle, own_bundle, retarget_bundle  # noqa: E402
from fastsam2.export.tensorrt import build_engines, check_engines, shape_profiles  # noqa: E402
from fastsam2.profiles import load_profile  # noqa: E402
from fastsam2.runtime.bundle import load_bundle, sha256_file  # noqa: E402
from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, dynamic_inputs  # noqa: E402
from fastsam2.runtime.errors import BackendError, BundleError  # noqa: E402
from fastsam2.runtime.track import PromptSpec, track  # noqa: E402


def export_hook(bundle_dir, tmp_path, target, keep=0.5):
    """What fastsam2-export does about engines for `target` (the session's bundle retargeted):
    plan, and build + check where the GPU fits. Returns (bundle folder, manifest's engines)."""
    b = tmp_path / "b"
    return b, retarget_bundle(bundle_dir, b, target, keep=keep)["engines"]


def test_export_builds_engines_for_this_gpu_and_run_uses_them(monkeypatch, tmp_path, synth, bundle_dir):
    em = emu.install(monkeypatch)  # an emulated sm 9.0 GPU: the hopper profile's
    out = tmp_path / "b"
    m = retarget_bundle(bundle_dir, out, "hopper", keep=0.5)
    e = m["engines"]
    p = load_profile("hopper")
    assert e["built"] is True and e["gpu_name"] == "Emulated GPU" and e["tensorrt_version"] == emu.EMU_TRT
    assert e["compute_capability"] == "9.0" and e["precision"] == "fp16"
    edir = out / "engines" / "hopper"
    assert (edir / "build_plan.sh").is_file() and (edir / "timing.cache").read_bytes() == em.trt.timing_tag
    assert "built in" in (edir / "build.log").read_text()
    for g in GRAPH_ORDER:
        f = out / e["graphs"][g]["file"]
        assert f.parent == edir and f.name == f"{g}.engine" and e["graphs"][g]["sha256"] == sha256_file(f)

    # each engine was checked against its ONNX graph (the emulated engines compute with ORT), at
    # the opt shapes and, where shapes are dynamic, at the profile's maxima
    assert sorted(e["checks"]) == sorted(GRAPH_ORDER) and all(c["passed"] for c in e["checks"].values())
    errs = [o["max_abs_err"] for c in e["checks"].values() for o in c["outputs"].values()]
    assert len(errs) == sum(len(GRAPHS[g].outputs) for g in GRAPH_ORDER) and max(errs) <= 1e-5
    assert [b["graph"] for b in em.builds] == list(GRAPH_ORDER)
    for b in em.builds:
        assert b["flags"] == {"FP16"} and b["workspace"] == p.workspace_mib << 20 and b["precision"] == "fp16"
        assert b["level"] == p.builder_optimization_level and b["device"] == "GPU"
        # the builder got exactly the profile the manifest (and the build plan) state
        want = {n: [tuple(s) for s in v] for n, v in e.get("profile_shapes", {}).get(b["graph"], {}).items()}
        assert b["profile"] == want and sorted(want) == sorted(dynamic_inputs(b["graph"]))
    ran = {x.spec.name: x.seen for x in em.engines[:len(GRAPH_ORDER)]}  # the checks' engines
    assert ran["memory_attention"]["memory"] == tuple(e["profile_shapes"]["memory_attention"]["memory"][2])
    # the checks reach the profile's maxima: the most objects (B) and prompt points (P)
    assert ran["mask_decoder"]["point_coords"] == tuple(e["profile_shapes"]["mask_decoder"]["point_coords"][2])
    assert ran["mask_decoder"]["point_coords"][1:] == (p.max_points, 2)

    # the runtime picks the engines by itself and tracks like ONNX Runtime does
    prompt = PromptSpec(points=[synth.first_frame_points[1]])
    res = track(synth.frames_dir_or_file, out, prompt, tmp_path / "r", backend="auto", overlay=False,
                max_frames=9)
    ref = track(synth.frames_dir_or_file, out, prompt, tmp_path / "r2", backend="ort-cpu", overlay=False,
                max_frames=9)
    # five engines loaded by the export's checks, five by the run
    assert res["backend"] == "tensorrt" and len(em.engines) == 2 * len(GRAPH_ORDER)
    assert [f["mask_area"] for f in res["frames"]] == [f["mask_area"] for f in ref["frames"]]
    assert load_bundle(out).manifest["engines"]["built"] is True  # the bundle still verifies


@pytest.mark.parametrize("trt_version", emu.TRT_VERSIONS)
def test_build_and_check_on_both_tensorrt_apis(monkeypatch, tmp_path, bundle_dir, trt_version):
    """8.6 wants an explicit-batch network and gives int32 index inputs, 10.x neither; both
    engines match ONNX Runtime at the opt shapes and at the profile's maxima."""
    em = emu.install(monkeypatch, trt_version=trt_version)
    b, info = export_hook(bundle_dir, tmp_path, "hopper")
    assert info["built"] is True and info["tensorrt_version"] == trt_version
    assert all(c["passed"] for c in info["checks"].values())
    at = {g: {o["at"] for o in c["outputs"].values()} for g, c in info["checks"].items()}
    assert at["image_encoder"] == {"opt"} and at["memory_attention"] <= {"opt", "max"}
    index = np.int32 if trt_version == emu.TRT86 else np.int64
    ma = next(x for x in em.engines if x.spec.name == "memory_attention")
    assert ma.dtypes["curr_idx"] == index and ma.calls == 2  # opt, then max


def test_inconsistent_profile_is_refused_by_the_builder(monkeypatch, tmp_path, bundle_dir):
    """min > opt for N: TensorRT answers -1 when the profile is added; export says which graph,
    the build log holds TensorRT's words, and nothing was built."""
    emu.install(monkeypatch)
    p = load_profile("hopper")
    shapes = shape_profiles(p, 256, 0.5)
    lo, opt, hi = shapes["memory_attention"]["curr"]
    shapes["memory_attention"]["curr"] = (opt, lo, hi)
    b = tmp_path / "b"
    own_bundle(bundle_dir, b)
    with pytest.raises(BackendError, match="refused memory_attention's optimisation profile"):
        build_engines(b, p, shapes)
    log = (b / "engines" / "hopper" / "build.log").read_text()
    assert "optimization profile for curr: min (128, 256) opt (77, 256)" in log
    assert not (b / "engines" / "hopper" / "memory_attention.engine").exists()


def test_dla_target_builds_on_dla_with_gpu_fallback(monkeypatch, tmp_path, bundle_dir):
    em = emu.install(monkeypatch, gpu=emu.ORIN_GPU)
    _, info = export_hook(bundle_dir, tmp_path, "jetson-orin")
    assert info["built"] is True and info["dla_core"] == 0
    assert all(b["device"] == "DLA" and b["dla_core"] == 0 and "GPU_FALLBACK" in b["flags"] for b in em.builds)
    assert all(x.dla_core == 0 for x in em.engines)  # the checks loaded them on DLA core 0


def test_dla_target_on_a_gpu_without_dla_fails_the_build(monkeypatch, tmp_path, bundle_dir):
    """An Orin Nano-like device (sm 8.7, no DLA) given the AGX Orin target: TensorRT cannot build
    for DLA core 0 there; export says so and the build log holds the reason."""
    emu.install(monkeypatch, gpu={**emu.ORIN_GPU, "dla_cores": 0})
    with pytest.raises(BackendError, match="could not build image_encoder"):
        export_hook(bundle_dir, tmp_path, "jetson-orin")
    log = (tmp_path / "b" / "engines" / "jetson-orin" / "build.log").read_text()
    assert "DLA core 0 requested; this device has 0 DLA cores" in log


def test_other_gpu_gets_the_plan_only(monkeypatch, tmp_path, bundle_dir):
    em = emu.install(monkeypatch)  # sm 9.0 here; jetson-orin is sm 8.7
    b, info = export_hook(bundle_dir, tmp_path, "jetson-orin")
    assert info["built"] is False and em.builds == []
    assert (b / "engines" / "jetson-orin" / "build_plan.sh").is_file()


def test_int8_without_calibration_cache_fails_cleanly(monkeypatch, tmp_path):
    emu.install(monkeypatch)
    src = tmp_path / "hopper-int8.toml"  # a custom target: --target accepts a TOML path
    text = resources.files("fastsam2.profiles").joinpath("hopper.toml").read_text()
    src.write_text(text.replace('precision = "fp16"', 'precision = "int8"'))
    out = tmp_path / "b"
    with pytest.raises(BundleError, match=r"int8 needs a calibration cache at .*calibration_image_encoder\.cache"):
        export_tiny_bundle(out, target=str(src), keep=0.5)
    assert not out.exists() and not list(tmp_path.glob("b*"))  # nothing half-written


def test_engine_that_differs_from_onnx_is_reported(monkeypatch, tmp_path, bundle_dir, caplog):
    """An engine whose numbers drift (here: the emulated router engine adds 0.5 to its outputs)
    is built and recorded, with a failed check and one warning line."""
    emu.install(monkeypatch)
    monkeypatch.setattr(emu, "PERTURB", {"router": 0.5})
    caplog.set_level(logging.INFO, logger="fastsam2")
    _, info = export_hook(bundle_dir, tmp_path, "hopper")
    said = caplog.messages
    checks = info["checks"]
    assert info["built"] is True and checks["router"]["passed"] is False
    assert all(checks[g]["passed"] for g in GRAPH_ORDER if g != "router")
    assert checks["router"]["outputs"]["scores"]["max_abs_err"] == pytest.approx(0.5, abs=1e-4)
    warned = [s for s in said if s.startswith("warning: router engine differs")]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "engine checks vs ONNX Runtime: 4/5 within tolerance" in said


def test_engine_with_non_finite_outputs_fails_its_check(monkeypatch, tmp_path, bundle_dir):
    """NaN out of an engine (what reading outputs before the stream synchronised gives on the
    emulated device) is the worst error, never a pass; here memory attention goes wrong only at
    the profile's maxima (the full bank), after a good run at the opt shapes."""
    emu.install(monkeypatch)
    p = load_profile("hopper")
    shapes = shape_profiles(p, 256, 0.5)
    n_max = shapes["memory_attention"]["curr"][2][0]
    monkeypatch.setattr(emu, "PERTURB", {"memory_attention": lambda s: np.nan if s["curr"][0] == n_max else 0.0})
    b = tmp_path / "b"
    own_bundle(bundle_dir, b)
    built = build_engines(b, p, shapes)
    report = check_engines(b, built, shapes, p.precision)
    worst = report["memory_attention"]["outputs"]["conditioned"]
    assert report["memory_attention"]["passed"] is False and np.isnan(worst["max_abs_err"]) and worst["at"] == "max"
    assert all(report[g]["passed"] for g in GRAPH_ORDER if g != "memory_attention")
