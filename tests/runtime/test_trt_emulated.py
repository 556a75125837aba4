"""The native TensorRT backend on an emulated device (no GPU in CI): `TensorRTSession`,
`create_sessions("tensorrt")`, the engine/GPU compatibility check, GPU detection and the whole
`track()` loop run for real; CUDA and the `tensorrt` module are emulated (tests/trt_emulation.py),
strict about copies, stream synchronisation, profiles and dtypes, for TensorRT 8.6 (int32 index
inputs) and 10.x (int64). Not TensorRT's numerics or speed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("polygraphy")

import trt_emulation as emu  # noqa: E402
from fastsam2.runtime import trt_backend  # noqa: E402
from fastsam2.runtime.contract import GRAPHS, GRAPH_ORDER  # noqa: E402
from fastsam2.runtime.errors import BundleError, InputError  # noqa: E402
from fastsam2.runtime.track import PromptSpec, track  # noqa: E402


@pytest.fixture
def emulated_device(monkeypatch):
    return emu.install(monkeypatch)


@pytest.fixture
def engine_bundle(tmp_path, bundle_dir):
    return emu.make_engine_bundle(tmp_path / "b", bundle_dir)


def _run(bundle, synth, out, backend, keep=0.5, frames=None, prompt=None):
    prompt = prompt or PromptSpec(points=[synth.first_frame_points[1]])
    return track(synth.frames_dir_or_file, bundle, prompt, out, keep=keep, backend=backend, overlay=False,
                 max_frames=frames, warn=lambda _: None)


def most_points(synth) -> PromptSpec:
    """The profile's most prompt points (8): a box (two), four clicks inside it, two outside."""
    x0, y0, x1, y1 = synth.first_frame_boxes[1]
    cx, cy = synth.first_frame_points[1]
    inside = [(cx, cy), ((x0 + cx) // 2, cy), ((x1 + cx) // 2, cy), (cx, (y0 + cy) // 2)]
    return PromptSpec(points=inside, neg_points=[(2, 2), (synth.width - 3, synth.height - 3)],
                      box=(x0, y0, x1, y1))


@pytest.fixture(scope="module")
def ort_at_the_limits(bundle_dir, synth, tmp_path_factory):
    """ONNX Runtime's run at keep 1.0 with 8 points: the reference of both TensorRT versions."""
    return _run(bundle_dir, synth, tmp_path_factory.mktemp("ort"), "ort-cpu", keep=1.0, prompt=most_points(synth))


@pytest.mark.parametrize("trt_version", emu.TRT_VERSIONS)
def test_tensorrt_backend_tracks_like_onnxruntime(monkeypatch, bundle_dir, synth, tmp_path, trt_version,
                                                  ort_at_the_limits):
    """Every frame through the engines at the profiles' maxima: keep 1.0 (N = T), a memory bank
    that fills (Ms = T + 6 T after 7 frames), 8 prompt points; int32 index inputs on 8.6."""
    em = emu.install(monkeypatch, trt_version=trt_version)
    bundle = emu.make_engine_bundle(tmp_path / "b", bundle_dir, trt_version)
    res = _run(bundle, synth, tmp_path / "trt", "tensorrt", keep=1.0, prompt=most_points(synth))
    ref = ort_at_the_limits
    assert res["backend"] == "tensorrt" and ref["backend"] == "ort-cpu"
    assert len(res["frames"]) == len(ref["frames"]) == len(list((tmp_path / "trt" / "masks").glob("*.png")))
    for a, b in zip(res["frames"], ref["frames"]):
        assert a["kept_tokens"] == b["kept_tokens"] and a["mask_area"] == b["mask_area"]
        oa, ob = a["objects"]["1"], b["objects"]["1"]
        assert oa["mask_area"] == ob["mask_area"] and oa["bbox"] == ob["bbox"]
        assert oa["object_score"] == pytest.approx(ob["object_score"], abs=1e-3)
    # every graph ran through its engine (keep 1.0 keeps every token: no router), on buffers of
    # the dtype this TensorRT gives index inputs
    by_graph = {e.spec.name: e for e in em.engines}
    assert sorted(by_graph) == sorted(GRAPH_ORDER)
    assert {g for g, e in by_graph.items() if e.calls} == set(GRAPH_ORDER) - {"router"}
    index = np.int64 if trt_version.startswith("10.") else np.int32
    assert by_graph["memory_attention"].dtypes["curr_idx"] == by_graph["memory_attention"].dtypes["memory_idx"] == index
    # ... and reached the profile's maxima: N = T, the full bank of spatial memories, 8 points
    hi = {n: v[2] for n, v in by_graph["memory_attention"].profile.items()}
    seen = by_graph["memory_attention"].seen
    assert seen["curr"] == hi["curr"] and seen["memory_idx"] == hi["memory_idx"]
    # (one object here: the batch axis B stays at 1; the point axis P reaches its maximum)
    assert by_graph["mask_decoder"].seen["point_coords"][1:] == by_graph["mask_decoder"].profile["point_coords"][2][1:]
    # each run synchronised its stream and left nothing queued
    assert em.device.stats["synchronize"] == sum(e.calls for e in em.engines) and em.device.pending() == 0


def test_auto_picks_tensorrt_when_engines_match(emulated_device, engine_bundle, synth, tmp_path):
    assert _run(engine_bundle, synth, tmp_path / "r", "auto", frames=2)["backend"] == "tensorrt"


def test_engine_from_another_gpu_is_refused(emulated_device, engine_bundle, synth, tmp_path):
    emulated_device.device.gpu = {"gpu_name": "Orin", "compute_capability": "8.7"}  # libcudart says so
    with pytest.raises(BundleError, match=r"built for GPU 'Emulated GPU', this machine has 'Orin'"):
        _run(engine_bundle, synth, tmp_path / "r", "tensorrt", frames=2)
    # auto says why and runs on ONNX Runtime instead
    said = []
    res = track(synth.frames_dir_or_file, engine_bundle, PromptSpec(points=[synth.first_frame_points[1]]),
                tmp_path / "r2", backend="auto", overlay=False, max_frames=2, warn=said.append)
    assert res["backend"] == "ort-cpu"
    assert any("built for GPU 'Emulated GPU'" in w and "falling back to ort-cpu" in w for w in said)


def test_unreadable_engine_is_one_line(emulated_device, engine_bundle, synth, tmp_path):
    (engine_bundle / "engines" / "hopper" / "router.engine").write_bytes(b"not an engine")
    with pytest.raises(BundleError) as e:
        _run(engine_bundle, synth, tmp_path / "r", "tensorrt", frames=2)
    assert "cannot load" in str(e.value) and "\n" not in str(e.value)


def test_keep_outside_the_engine_profile(emulated_device, engine_bundle, synth, tmp_path):
    with pytest.raises(InputError, match=r"outside the engines' profile range 0.3..1.0"):
        _run(engine_bundle, synth, tmp_path / "r", "tensorrt", keep=0.2, frames=2)
    # a shape the engine's profile does not cover is refused at run time too, naming the range
    s = trt_backend.TensorRTSession(engine_bundle / "engines" / "hopper" / "memory_attention.engine")
    feeds = {t.name: np.zeros(t.resolve({"N": 300, "M": 300, "Ms": 296}), t.dtype)
             for t in GRAPHS["memory_attention"].inputs}
    with pytest.raises(InputError, match=r"outside the engine's optimisation profile"):
        s.run(feeds)
    s.close()


def test_profile_times_the_engines(emulated_device, engine_bundle):
    from fastsam2.runtime.profiling import profile_bundle

    rep = profile_bundle(engine_bundle, backend="tensorrt,ort-cpu", keeps=[0.5], memory_frames=3,
                         warmup=1, iters=2)
    assert rep["settings"]["backends"] == ["tensorrt", "ort-cpu"]
    by = {r["backend"]: r for r in rep["results"]}
    assert sorted(by) == ["ort-cpu", "tensorrt"]
    # the same shapes went through the engines as through ONNX Runtime, and every graph was timed
    assert by["tensorrt"]["shapes"] == by["ort-cpu"]["shapes"]
    assert all(by["tensorrt"]["graphs"][g]["median_ms"] > 0 for g in GRAPH_ORDER)
    assert sum(e.calls for e in emulated_device.engines) == 3 * len(GRAPH_ORDER)  # 1 warm-up + 2 timed


def test_jetson_flow_build_plan_on_the_device_then_run(monkeypatch, tmp_path, synth, bundle_dir):
    """The Jetson story end to end: export for jetson-orin elsewhere (plan only), run
    build_plan.sh on the "device" (an Orin with 2 DLA cores and JetPack 6.0's TensorRT 8.6 in the
    child processes; the stand-in trtexec checks every flag's value), which records the engines;
    then fastsam2-run picks them up and tracks like ONNX Runtime."""
    import os
    import subprocess

    from conftest import retarget_bundle
    from fastsam2.profiles import load_profile

    emu.install(monkeypatch)  # this "machine" is an sm 9.0 GPU, not the Orin: plan only
    out = tmp_path / "b"
    m = retarget_bundle(bundle_dir, out, "jetson-orin", keep=0.5)
    assert m["engines"]["built"] is False
    plan = out / "engines" / "jetson-orin" / "build_plan.sh"
    env = {**os.environ, **emu.write_child_emulation(tmp_path / "device", emu.ORIN_GPU, emu.TRT86),
           "SKIP_CHECKS": "1"}
    r = subprocess.run(["bash", str(plan)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recorded 5 engines for Orin (nvgpu) (sm 8.7, TensorRT 8.6.1-emulated)" in r.stdout + r.stderr
    rec = json.loads((out / "engines" / "jetson-orin" / "engines.json").read_text())
    assert rec["built"] is True and rec["gpu_name"] == "Orin (nvgpu)" and rec["tensorrt_version"] == emu.TRT86
    # each engine is what the target profile asks for: the manifest's optimisation profile,
    # precision, DLA core, workspace and optimisation level, for this GPU and TensorRT
    p = load_profile("jetson-orin")
    for g in GRAPH_ORDER:
        head = emu.engine_header((out / "engines" / "jetson-orin" / f"{g}.engine").read_bytes())
        assert head["profile"] == m["engines"]["profile_shapes"].get(g, {}), g
        assert (head["precision"], head["dla_core"], head["workspace"], head["level"]) == (
            p.precision, p.dla_core, p.workspace_mib << 20, p.builder_optimization_level)
        assert (head["trt"], head["compute_capability"]) == (emu.TRT86, "8.7")

    em = emu.install(monkeypatch, gpu=emu.ORIN_GPU, trt_version=emu.TRT86)
    res = _run(out, synth, tmp_path / "r", "auto", frames=9)
    ref = _run(out, synth, tmp_path / "r2", "ort-cpu", frames=9)
    assert res["backend"] == "tensorrt"
    assert [e.dla_core for e in em.engines] == [0] * 5  # the profile's DLA core, set before loading
    assert [f["mask_area"] for f in res["frames"]] == [f["mask_area"] for f in ref["frames"]]

    eng = out / "engines" / "jetson-orin" / "router.engine"
    eng.write_bytes(eng.read_bytes() + b" ")
    with pytest.raises(BundleError, match="changed since it was recorded"):
        _run(out, synth, tmp_path / "r3", "tensorrt", frames=2)


def test_record_without_built_engines_names_what_is_missing(emulated_device, bundle_dir, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle_dir, b)
    m = json.loads((b / "manifest.json").read_text())
    m["engines"] = {"target": "jetson-orin", "keep_range": [0.3, 1.0], "built": False}
    (b / "manifest.json").write_text(json.dumps(m))
    emu.reseal(b)
    (b / "engines" / "jetson-orin").mkdir(parents=True)
    with pytest.raises(BundleError, match=r"lacks image_encoder.engine, router.engine, .* run build_plan.sh"):
        trt_backend.record_engines(b)


def test_tensorrt_before_the_plan_ran_says_how_to_build(emulated_device, bundle_dir, synth, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle_dir, b)
    m = json.loads((b / "manifest.json").read_text())
    m["engines"] = {"target": "jetson-orin", "keep_range": [0.3, 1.0], "built": False,
                    "build_plan": "engines/jetson-orin/build_plan.sh"}
    (b / "manifest.json").write_text(json.dumps(m))
    emu.reseal(b)
    with pytest.raises(trt_backend.BackendError) as e:
        _run(b, synth, tmp_path / "r", "tensorrt", frames=2)
    assert "has no TensorRT engines" in str(e.value) and "engines/jetson-orin/build_plan.sh" in str(e.value)
    assert _run(b, synth, tmp_path / "r2", "auto", frames=2)["backend"] == "ort-cpu"  # auto skips it
