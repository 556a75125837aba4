"""OpenVINO backend: the same masks as ONNX Runtime in fp32 (dynamic N, M, Ms included), its
place in `auto`, its devices, and one-line errors; plus the runtime's `--threads` bound."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import THREADS
from fastsam2.runtime import backends, openvino_backend
from fastsam2.runtime.bundle import load_bundle
from fastsam2.runtime.errors import BackendError, InputError
from fastsam2.runtime.precision import graph_precisions
from fastsam2.runtime.session import Session
from fastsam2.runtime.video import open_frames

pytest.importorskip("openvino")

# measured on the 256-px test bundle: OpenVINO fp32 vs ONNX Runtime low-res logits max |diff|
# 5.5e-7 over 10 frames at keep 1.0 and 0.5 (logits peak ~0.5); bound ~10x
LOGITS_ATOL = 5e-6


def track_logits(graphs, bundle, video, keep, frames=8) -> np.ndarray:
    """Low-res logits of object 1 over `frames` frames, through the session on open graphs."""
    s = Session.open(bundle, keep=keep, graphs=graphs, num_frames=video.num_frames)
    s.add_prompt(1, points=[tuple(video.first_frame_points[1])])
    out = []
    with open_frames(video.frames_dir_or_file) as src:
        for i, rgb in src:
            if i >= frames:
                break
            out.append(s.push(rgb).objects[1].logits.copy())
    return np.stack(out)


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_openvino_fp32_matches_onnxruntime(bundle_dir, synth, keep):
    """keep 0.5 feeds memory attention a new N and a growing M / Ms every frame (dynamic shapes)."""
    bundle = load_bundle(bundle_dir)
    name, ov = backends.open_backend("openvino", bundle, threads=THREADS, precision="fp32")
    assert name == "openvino"
    assert all(s.providers == ["OpenVINO:CPU:f32"] for s in ov.values())  # f32 asked, not the plugin default
    ref = track_logits(("ort-cpu", backends.create_sessions(bundle, "ort-cpu", THREADS, precision="fp32")),
                       bundle, synth, keep)
    got = track_logits((name, ov), bundle, synth, keep)
    assert np.abs(got - ref).max() <= LOGITS_ATOL
    assert ((got > 0) == (ref > 0)).all()


def test_auto_tries_openvino_first_only_where_the_target_asks(monkeypatch, bundle_dir):
    bundle = load_bundle(bundle_dir)
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu", "openvino"])
    assert backends._candidates("auto", bundle) == ["ort-cpu", "openvino"]
    bundle.manifest["openvino"] = {"device": "CPU", "precision": "fp32", "preferred": True}  # intel-* targets
    assert backends._candidates("auto", bundle) == ["openvino", "ort-cpu"]
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu"])
    with pytest.raises(BackendError, match=r"'openvino' is not available here \(pip install fastsam2\[openvino\]\)"):
        backends.pick_backend("openvino", bundle)


def test_available_lists_openvino_when_installed(monkeypatch):
    assert "openvino" in backends.available_backends()
    monkeypatch.setattr(openvino_backend, "openvino_available", lambda: False)
    assert "openvino" not in backends.available_backends()


def test_npu_takes_static_graphs_only():
    assert openvino_backend.graph_device("NPU", dynamic=True) == "CPU"
    assert openvino_backend.graph_device("NPU", dynamic=False) == "NPU"
    assert openvino_backend.graph_device("GPU", dynamic=True) == "GPU"


def test_missing_device_is_one_line(monkeypatch, bundle_dir):
    bundle = load_bundle(bundle_dir)
    monkeypatch.setenv("FASTSAM2_OPENVINO_DEVICE", "GPU")
    with pytest.raises(BackendError) as e:
        backends.create_sessions(bundle, "openvino", 1)
    assert "OpenVINO has no GPU device here (it has: CPU" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("FASTSAM2_OPENVINO_DEVICE", "TPU")
    with pytest.raises(InputError, match="OpenVINO device 'TPU'"):
        backends.create_sessions(bundle, "openvino", 1)


def bf16_encoder_bundle(bundle_dir):
    """The bundle as export writes it on an AVX512-BF16 CPU whose gate picked a bf16 encoder:
    a hint on the fp32 file that only OpenVINO runs."""
    bundle = load_bundle(bundle_dir)
    g = bundle.manifest["graphs"]["image_encoder"]
    g["variants"] = {"bf16": {"file": g["file"], "sha256": g["sha256"], "format": "hint", "backends": ["openvino"]}}
    bundle.manifest["precision"] = {"image_encoder": "bf16"}
    return bundle


def test_auto_runs_a_bf16_encoder_on_openvino_and_the_rest_on_onnxruntime(monkeypatch, bundle_dir, synth, tmp_path):
    """Issue 23: what the target picked runs where it was picked. `auto` on a CPU must not drop
    the bf16 encoder to fp32 ONNX Runtime: it runs that graph on OpenVINO, the others on ORT."""
    monkeypatch.setattr(openvino_backend, "device_has_bf16", lambda device="CPU": True)
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu", "openvino"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty OpenVINO cache: a first run
    bundle = bf16_encoder_bundle(bundle_dir)
    said = []
    name, sessions = backends.open_backend("auto", bundle, THREADS, warn=said.append)
    assert name == "ort-cpu+openvino"
    assert isinstance(sessions["image_encoder"], openvino_backend.OpenVINOSession)
    assert sessions["image_encoder"].precision == "bf16"
    assert all(type(sessions[g]).__name__ in ("OrtSession", "AttentionBySize") for g in sessions if g != "image_encoder")
    cache = openvino_backend.cache_dir(bundle.manifest["graphs"]["image_encoder"]["sha256"])
    assert said == [f"openvino: compiling image_encoder.onnx for CPU in bf16 (once: cached in {cache})",
                    "backend auto: image_encoder bf16 on openvino (ONNX Runtime runs no bf16 graph here), "
                    "the other graphs on ort-cpu"]
    said.clear()  # the second open loads the compiled graph: no compile line
    assert backends.open_backend("auto", bundle, THREADS, warn=said.append)[0] == "ort-cpu+openvino"
    assert len(said) == 1 and said[0].startswith("backend auto:")
    # the mixed chain tracks like the all-fp32 one (OpenVINO's bf16 encoder vs fp32: same masks)
    got = track_logits((name, sessions), bundle, synth, 1.0, frames=4)
    ref = track_logits(("ort-cpu", backends.create_sessions(bundle, "ort-cpu", THREADS, precision="fp32")),
                       bundle, synth, 1.0, frames=4)
    assert got.shape == ref.shape and ((got > 0) == (ref > 0)).mean() > 0.97
    # fp32 asked for: nothing moves; a named backend: nothing moves either
    assert backends.open_backend("auto", bundle, THREADS, warn=said.append, precision="fp32")[0] == "ort-cpu"
    assert backends.open_backend("ort-cpu", bundle, THREADS, warn=said.append)[0] == "ort-cpu"
    # no OpenVINO here: ONNX Runtime runs it in fp32 and says why
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu"])
    said.clear()
    assert backends.open_backend("auto", bundle, THREADS, warn=said.append)[0] == "ort-cpu"
    assert said and "image_encoder runs in fp32, not bf16" in said[0]


def test_asking_a_precision_the_backend_runs_nowhere_says_so(monkeypatch, bundle_dir):
    """FASTSAM2_PRECISION=bf16 on ort-cpu with bf16 variants only OpenVINO runs: the backend is
    named as the reason (a BackendError), not a missing variant that the bundle has."""
    bundle = bf16_encoder_bundle(bundle_dir)
    with pytest.raises(BackendError, match="ort-cpu runs none of the bundle's bf16 variants here"):
        graph_precisions(bundle, "ort-cpu", "bf16", warn=lambda m: None)
    bundle.manifest["graphs"]["image_encoder"].pop("variants")
    from fastsam2.runtime.errors import BundleError

    with pytest.raises(BundleError, match="the bundle has no bf16 variant of any graph"):
        graph_precisions(bundle, "ort-cpu", "bf16", warn=lambda m: None)


def test_bf16_falls_back_to_fp32_and_says_why(monkeypatch, bundle_dir):
    """A bundle that picked bf16 (exported on a CPU with AVX512_BF16/AMX) run where OpenVINO
    reports no BF16: each such graph runs fp32, with one warning naming the reason."""
    bundle = load_bundle(bundle_dir)
    g = bundle.manifest["graphs"]["image_encoder"]
    g["variants"] = {"bf16": {"file": g["file"], "sha256": g["sha256"], "format": "hint"}}
    bundle.manifest["precision"] = {"image_encoder": "bf16"}
    monkeypatch.setattr(openvino_backend, "device_has_bf16", lambda device="CPU": False)
    said = []
    assert graph_precisions(bundle, "openvino", warn=said.append)["image_encoder"] == "fp32"
    assert len(said) == 1 and "image_encoder runs in fp32, not bf16" in said[0] and "AVX512_BF16 or AMX" in said[0]
    monkeypatch.setattr(openvino_backend, "device_has_bf16", lambda device="CPU": True)
    assert graph_precisions(bundle, "openvino", warn=said.append)["image_encoder"] == "bf16"
    # ONNX Runtime's bf16 GEMMs exist on ARM64 only
    said.clear()
    assert graph_precisions(bundle, "ort-cpu", warn=said.append)["image_encoder"] == "fp32"
    assert "ARM64 only" in said[0]


def test_device_bf16_probe_matches_cpu_flags():
    """OpenVINO's BF16 capability and /proc/cpuinfo's flags agree (whichever this CPU has)."""
    from fastsam2.runtime import host

    assert openvino_backend.device_has_bf16("CPU") == host.cpu_has_bf16()


@pytest.mark.parametrize("threads", [0, -1, 100000, 1000, backends.default_threads() + 1, 2.5, True])
def test_threads_beyond_the_machine_are_refused(bundle_dir, threads):
    """onnxruntime crashes at 100000 threads and hangs at 1000: refused before any session."""
    bundle = load_bundle(bundle_dir)
    with pytest.raises(InputError) as e:
        backends.open_backend("ort-cpu", bundle, threads=threads)
    msg = str(e.value)
    assert msg == (f"--threads must be in 1..{backends.default_threads()} (the CPUs this process may use), "
                   f"got {threads}")


def test_threads_within_the_machine_run(bundle_dir):
    bundle = load_bundle(bundle_dir)
    top = backends.default_threads()
    assert backends.check_threads(None) is None and backends.check_threads(top) == top
    s = backends.create_sessions(bundle, "ort-cpu", 1)
    assert s["memory_encoder"].session.get_session_options().intra_op_num_threads == 1
