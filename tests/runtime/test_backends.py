"""Backend choice: what counts as available, what `auto` does when a GPU backend fails to start,
and the ONNX Runtime TensorRT provider options built from the bundle's optimisation profiles.

No GPU here: GPU availability is faked by patching the two probes (`_gpu_visible`,
`tensorrt_available`); the sessions themselves are real onnxruntime sessions on the tiny bundle.
"""

from __future__ import annotations

import json

import onnxruntime
import pytest

from conftest import retarget_bundle
from fastsam2.runtime import backends, openvino_backend, trt_backend
from fastsam2.runtime.bundle import load_bundle
from fastsam2.runtime.contract import MAX_BATCH
from fastsam2.runtime.errors import BackendError, InputError
from fastsam2.runtime.track import PromptSpec, track

ALL_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(autouse=True)
def no_openvino(monkeypatch):
    """These tests pin the ONNX Runtime / TensorRT lists; OpenVINO's place is tested on its own."""
    monkeypatch.setattr(openvino_backend, "openvino_available", lambda: False)


@pytest.fixture
def fake_gpu_eps(monkeypatch):
    """onnxruntime-gpu's provider list, as it reports it on any machine."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(ALL_EPS))


def test_gpu_providers_count_only_with_a_visible_gpu(monkeypatch, fake_gpu_eps):
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: False)
    monkeypatch.setattr(backends, "_gpu_visible", lambda: False)
    assert backends.available_backends() == ["ort-cpu"]
    monkeypatch.setattr(backends, "_gpu_visible", lambda: True)
    assert backends.available_backends() == ["ort-cpu", "ort-cuda", "ort-trt"]


def test_named_gpu_provider_is_tried_even_without_a_detected_gpu(monkeypatch, fake_gpu_eps, bundle_dir):
    """GPU detection can miss (no nvidia-smi queries on Jetson, CUDA only inside pip wheels):
    `auto` skips undetected GPUs, a backend asked for by name is tried and checked."""
    bundle = load_bundle(bundle_dir)
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: False)
    monkeypatch.setattr(backends, "_gpu_visible", lambda: False)
    assert backends._candidates("auto", bundle) == ["ort-cpu"]
    assert backends._candidates("ort-trt", bundle) == ["ort-trt"]
    with pytest.raises(BackendError, match="tensorrt.*not available"):
        backends._candidates("tensorrt", bundle)


def test_tensorrt_listed_when_tensorrt_and_gpu_are_there(monkeypatch):
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: True)
    assert "tensorrt" in backends.available_backends()
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: False)
    assert "tensorrt" not in backends.available_backends()


def test_auto_order_and_engines(monkeypatch, bundle_dir):
    bundle = load_bundle(bundle_dir)
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu", "ort-cuda", "tensorrt"])
    # a bundle without built engines never resolves to the native TensorRT backend
    assert backends._candidates("auto", bundle) == ["ort-cuda", "ort-cpu"]
    bundle.manifest["engines"] = {"built": True}
    assert backends._candidates("auto", bundle) == ["tensorrt", "ort-cuda", "ort-cpu"]
    assert backends.pick_backend("ort-cpu", bundle) == "ort-cpu"
    with pytest.raises(InputError, match="unknown backend 'cuda'"):
        backends.pick_backend("cuda", bundle)
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu"])
    with pytest.raises(BackendError, match=r"'ort-trt' is not available here .*available: ort-cpu"):
        backends.pick_backend("ort-trt", bundle)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_provider_that_does_not_start_is_refused_not_hidden(monkeypatch, bundle_dir):
    """CPU onnxruntime cannot start the CUDA provider and runs on the CPU instead: a named GPU
    backend must fail in one line, `auto` must fall back to ort-cpu and say so."""
    bundle = load_bundle(bundle_dir)
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu", "ort-cuda"])
    with pytest.raises(BackendError) as e:
        backends.open_backend("ort-cuda", bundle)
    msg = str(e.value)
    assert "could not start CUDAExecutionProvider" in msg and "--backend ort-cpu" in msg and "\n" not in msg
    said = []
    name, sessions = backends.open_backend("auto", bundle, warn=said.append)
    assert name == "ort-cpu" and sorted(sessions) == sorted(backends.GRAPH_ORDER)
    assert len(said) == 1 and said[0].startswith("warning: ") and "falling back to ort-cpu" in said[0]


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_run_reports_the_backend_that_ran(monkeypatch, bundle_dir, synth, tmp_path):
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu", "ort-cuda"])
    said = []
    res = track(synth.frames_dir_or_file, bundle_dir, PromptSpec(points=[synth.first_frame_points[1]]),
                tmp_path / "r", backend="auto", overlay=False, max_frames=2, warn=said.append)
    assert res["backend"] == "ort-cpu"
    assert json.loads((tmp_path / "r" / "results.json").read_text())["backend"] == "ort-cpu"
    assert any("falling back to ort-cpu" in s for s in said)
    with pytest.raises(BackendError, match="could not start CUDAExecutionProvider"):
        track(synth.frames_dir_or_file, bundle_dir, PromptSpec(points=[synth.first_frame_points[1]]),
              tmp_path / "r2", backend="ort-cuda", overlay=False, max_frames=2, warn=said.append)
    assert not (tmp_path / "r2" / "results.json").exists()


def _parse(spec: str) -> dict:
    return {n: tuple(int(d) for d in dims.split("x")) for n, dims in (p.split(":") for p in spec.split(","))}


def test_ort_trt_options_follow_the_export_profile(bundle_dir, tmp_path):
    out = tmp_path / "bj"
    m = retarget_bundle(bundle_dir, out, "jetson-orin-nano", keep=0.5)
    bundle = load_bundle(out)
    e = m["engines"]
    cache = tmp_path / "cache"
    cache.mkdir()
    opts = backends.ort_trt_options(bundle, "memory_attention", cache)
    ps = e["profile_shapes"]["memory_attention"]
    for i, which in enumerate(("min", "opt", "max")):
        assert _parse(opts[f"trt_profile_{which}_shapes"]) == {n: tuple(v[i]) for n, v in ps.items()}
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(cache)
    assert opts["trt_fp16_enable"] is (e["precision"] in ("fp16", "int8"))
    assert opts["trt_max_workspace_size"] == e["workspace_mib"] << 20
    assert opts.get("trt_dla_enable", False) is (e["dla_core"] >= 0)
    # graphs without dynamic inputs get no profile (TensorRT fixes their shapes itself)
    assert not any(k.startswith("trt_profile") for k in backends.ort_trt_options(bundle, "image_encoder", cache))


def test_ort_trt_options_for_an_onnx_only_bundle_cover_every_keep(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    t = m["token_grid"][0] * m["token_grid"][1]
    opts = backends.ort_trt_options(bundle, "memory_attention", tmp_path)
    lo, hi = _parse(opts["trt_profile_min_shapes"]), _parse(opts["trt_profile_max_shapes"])
    assert lo["curr"][0] == m["keep_floor"] and hi["curr"][0] == t  # keep floor .. keep 1.0
    nm = bundle.settings["num_maskmem"]
    assert lo["memory_idx"] == (t,) and hi["memory_idx"] == (nm * t,)
    # the P range of the mask decoder: one click .. the default 8 points
    dec = backends.ort_trt_options(bundle, "mask_decoder", tmp_path)
    assert _parse(dec["trt_profile_min_shapes"])["point_coords"] == (1, 1, 2)
    assert _parse(dec["trt_profile_max_shapes"])["point_coords"] == (MAX_BATCH, 8, 2)  # B objects, P points
    assert dec["trt_fp16_enable"] is False  # no target precision: fp32


def test_ort_trt_cache_falls_back_to_user_cache_for_read_only_bundle(monkeypatch, bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    own = tmp_path / "own"  # not the shared fixture: other tests hard-link its files
    own.mkdir()
    monkeypatch.setattr(bundle, "path", own)
    assert backends._ort_trt_cache_dir(bundle) == own / "engines" / "ort-trt"
    assert (own / "engines" / "ort-trt").is_dir()
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "engines").write_text("")  # cannot hold a folder, even for root
    monkeypatch.setattr(bundle, "path", blocked)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    d = backends._ort_trt_cache_dir(bundle)
    tag = bundle.manifest["graphs"]["memory_attention"]["sha256"][:12]
    assert d == tmp_path / "xdg" / "fastsam2" / "ort-trt" / tag and d.is_dir()


def test_onnxruntime_fallback_banner_becomes_the_reason(monkeypatch, bundle_dir, capsys):
    """onnxruntime-gpu print()s an "EP Error" banner and falls back to the CPU when a provider
    cannot load: the banner stays off stdout and its sentence ends up in the one-line error."""
    real = onnxruntime.InferenceSession

    def gpu_build_without_tensorrt(path, sess_options=None, providers=None):
        print("*************** EP Error ***************")
        print("EP Error /onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void "
              "onnxruntime::python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const "
              "onnxruntime::ProviderOptions&) Please install TensorRT libraries as mentioned in the "
              "GPU requirements page.\n when using [('TensorrtExecutionProvider', {})]")
        print("Falling back to ['CUDAExecutionProvider', 'CPUExecutionProvider'] and retrying.")
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "InferenceSession", gpu_build_without_tensorrt)
    s = backends.OrtSession(bundle_dir / "memory_encoder.onnx", ["TensorrtExecutionProvider"])
    assert capsys.readouterr().out == ""
    with pytest.raises(BackendError) as e:
        backends._check_provider(s, "TensorrtExecutionProvider", "memory_encoder")
    msg = str(e.value)
    assert "onnxruntime says: Please install TensorRT libraries as mentioned in the GPU requirements page." in msg
    assert "onnxruntime_src" not in msg and "::" not in msg and "\n" not in msg


def test_cpu_threads_spin_within_a_run_only(bundle_dir):
    """Each graph's pool stops spinning when its run ends, so it does not take the cores from the
    next graph of the frame (bench/levers.py chain: 256 px, 2 cores, ~1.5x per frame)."""
    s = backends.OrtSession(load_bundle(bundle_dir).graph_path("router"), ["CPUExecutionProvider"], threads=1)
    opts = s.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
