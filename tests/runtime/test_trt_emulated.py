"""The native TensorRT backend on an emulated device (no GPU in CI): `TensorRTSession`,
`create_sessions("tensorrt")`, the engine/GPU compatibility check and the whole `track()` loop
run for real; CUDA and the `tensorrt` module are emulated (see tests/trt_emulation.py). This
proves the session's name-based I/O, dtype casts (int32 index inputs, as TensorRT 8.6 makes
them), buffer growth while M changes every frame, output shapes and error paths; not TensorRT's
numerics or speed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("polygraphy")

import trt_emulation as emu  # noqa: E402
from fastsam2.runtime import trt_backend  # noqa: E402
from fastsam2.runtime.contract import GRAPHS, GRAPH_ORDER, dynamic_inputs, profile_shapes  # noqa: E402
from fastsam2.runtime.errors import BundleError, InputError  # noqa: E402
from fastsam2.runtime.track import PromptSpec, track  # noqa: E402


@pytest.fixture
def emulated_device(monkeypatch):
    return emu.install(monkeypatch)[0]


@pytest.fixture
def engine_bundle(tmp_path, bundle_dir):
    """The tiny bundle plus "engines" built for the emulated GPU, recorded in its manifest as
    fastsam2-export records a local build."""
    b = tmp_path / "b"
    shutil.copytree(bundle_dir, b)
    m = json.loads((b / "manifest.json").read_text())
    edir = b / "engines" / "hopper"
    edir.mkdir(parents=True)
    graphs = {}
    shapes = profile_shapes(m["image_size"], 0.25, 0.5, 1.0)
    for g in GRAPH_ORDER:
        profile = {n: shapes[g][n] for n in dynamic_inputs(g)}
        (edir / f"{g}.engine").write_bytes(emu.engine_blob(b / m["graphs"][g]["file"], g, profile))
        graphs[g] = {"file": f"engines/hopper/{g}.engine"}
    m["engines"] = {"target": "hopper", "keep_range": [0.3, 1.0], "precision": "fp16", "built": True,
                    **emu.EMU_GPU, "tensorrt_version": emu.EMU_TRT, "graphs": graphs}
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def _run(bundle, synth, out, backend, keep=0.5, frames=None):
    return track(synth.frames_dir_or_file, bundle, PromptSpec(points=[synth.first_frame_points[1]]),
                 out, keep=keep, backend=backend, overlay=False, max_frames=frames, warn=lambda _: None)


def test_tensorrt_backend_tracks_like_onnxruntime(emulated_device, engine_bundle, synth, tmp_path):
    res = _run(engine_bundle, synth, tmp_path / "trt", "tensorrt")
    ref = _run(engine_bundle, synth, tmp_path / "ort", "ort-cpu")
    assert res["backend"] == "tensorrt" and ref["backend"] == "ort-cpu"
    assert len(res["frames"]) == len(ref["frames"]) == len(list((tmp_path / "trt" / "masks").glob("*.png")))
    for a, b in zip(res["frames"], ref["frames"]):
        assert a["kept_tokens"] == b["kept_tokens"]
        assert a["mask_area"] == b["mask_area"] and a["bbox"] == b["bbox"]
        assert a["object_score"] == pytest.approx(b["object_score"], abs=1e-3)
    # every graph ran through its engine; memory attention saw N and M change (1..7 memories)
    by_graph = {e.spec.name: e.calls for e in emulated_device}
    assert all(c > 0 for c in by_graph.values()) and len(by_graph) == len(GRAPH_ORDER)


def test_auto_picks_tensorrt_when_engines_match(emulated_device, engine_bundle, synth, tmp_path):
    assert _run(engine_bundle, synth, tmp_path / "r", "auto", frames=2)["backend"] == "tensorrt"


def test_engine_from_another_gpu_is_refused(emulated_device, engine_bundle, synth, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_backend, "current_gpu", lambda: {"gpu_name": "Orin", "compute_capability": "8.7"})
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
    assert sum(e.calls for e in emulated_device) == 3 * len(GRAPH_ORDER)  # 1 warm-up + 2 timed


def test_jetson_flow_build_plan_on_the_device_then_run(monkeypatch, tmp_path, synth):
    """The Jetson story end to end: export for jetson-orin elsewhere (plan only), run
    build_plan.sh on the "device" (stand-in trtexec, emulated GPU in the child processes), which
    records the engines; then fastsam2-run picks them up and tracks like ONNX Runtime."""
    import os
    import subprocess

    from conftest import export_tiny_bundle

    emu.install(monkeypatch)  # this "machine" is an sm 9.0 GPU, not the Orin: plan only
    out = tmp_path / "b"
    m = export_tiny_bundle(out, target="jetson-orin", keep=0.5)
    assert m["engines"]["built"] is False
    plan = out / "engines" / "jetson-orin" / "build_plan.sh"
    env = {**os.environ, **emu.write_child_emulation(tmp_path / "device"), "SKIP_CHECKS": "1"}
    r = subprocess.run(["bash", str(plan)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recorded 5 engines for Emulated GPU" in r.stdout + r.stderr
    rec = json.loads((out / "engines" / "jetson-orin" / "engines.json").read_text())
    assert rec["built"] is True and rec["gpu_name"] == "Emulated GPU" and rec["tensorrt_version"] == emu.EMU_TRT
    # the engines carry the plan's optimisation profile, which is the manifest's
    blob = (out / "engines" / "jetson-orin" / "memory_attention.engine").read_bytes()
    head = json.loads(blob[4:blob.index(b"\n")])
    want = m["engines"]["profile_shapes"]["memory_attention"]
    assert head["profile"] == want

    engines = emu.install(monkeypatch)[0]
    res = _run(out, synth, tmp_path / "r", "auto", frames=9)
    ref = _run(out, synth, tmp_path / "r2", "ort-cpu", frames=9)
    assert res["backend"] == "tensorrt"
    assert [e.dla_core for e in engines] == [0] * 5  # the profile's DLA core, set before loading
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
    (b / "engines" / "jetson-orin").mkdir(parents=True)
    with pytest.raises(BundleError, match=r"lacks image_encoder.engine, router.engine, .* run build_plan.sh"):
        trt_backend.record_engines(b, log=lambda _: None)


def test_tensorrt_before_the_plan_ran_says_how_to_build(emulated_device, bundle_dir, synth, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle_dir, b)
    m = json.loads((b / "manifest.json").read_text())
    m["engines"] = {"target": "jetson-orin", "keep_range": [0.3, 1.0], "built": False,
                    "build_plan": "engines/jetson-orin/build_plan.sh"}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(trt_backend.BackendError) as e:
        _run(b, synth, tmp_path / "r", "tensorrt", frames=2)
    assert "has no TensorRT engines" in str(e.value) and "engines/jetson-orin/build_plan.sh" in str(e.value)
    assert _run(b, synth, tmp_path / "r2", "auto", frames=2)["backend"] == "ort-cpu"  # auto skips it
