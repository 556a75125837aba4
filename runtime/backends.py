"""Backends: ONNX Runtime (CPU, CUDA, TensorRT EP) and native TensorRT engines.

Every backend gives one session per graph with `.run(feeds) -> {output: array}`, which is all
the tracking loop needs.
"""

from __future__ import annotations

import os

from fastsam2.runtime.contract import GRAPH_ORDER
from fastsam2.runtime.errors import BackendError, InputError

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
_ORT_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


_SHARED_CPU_ARENA = False


def _share_cpu_arena(ort) -> bool:
    """One CPU memory arena for all five sessions instead of one each: their peaks no longer
    add up (measured at 1024 px, keep 0.3: peak RSS 2.2 GB -> 1.65 GB, same speed)."""
    global _SHARED_CPU_ARENA
    if not _SHARED_CPU_ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _SHARED_CPU_ARENA = True
        except Exception:  # older onnxruntime: per-session arenas, still correct
            return False
    return True


def default_threads() -> int:
    # the CPUs this process may run on (a container quota can be below os.cpu_count())
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


class OrtSession:
    def __init__(self, path, providers, threads: int | None = None, profile_dir=None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        if providers[0] == "CPUExecutionProvider" and _share_cpu_arena(ort):
            opts.add_session_config_entry("session.use_env_allocators", "1")
        opts.log_severity_level = 3  # shape-merge warnings of the exported Hiera are harmless
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile_dir)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def run(self, feeds: dict) -> dict:
        outs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))


def available_backends() -> list:
    found = []
    try:
        import onnxruntime as ort

        prov = ort.get_available_providers()
        found.append("ort-cpu")
        if "CUDAExecutionProvider" in prov:
            found.append("ort-cuda")
        if "TensorrtExecutionProvider" in prov:
            found.append("ort-trt")
    except ImportError:
        pass
    try:
        from fastsam2.runtime.trt_backend import tensorrt_runtime_available

        if tensorrt_runtime_available():
            found.append("tensorrt")
    except Exception:  # a broken TensorRT install must not break the CPU path
        pass
    return found


def pick_backend(requested: str, bundle) -> str:
    if requested not in BACKENDS:
        raise InputError(f"unknown backend '{requested}'; choose from {', '.join(BACKENDS)}")
    have = available_backends()
    if requested == "auto":
        engines = bundle.manifest.get("engines") or {}
        for name in ("tensorrt", "ort-trt", "ort-cuda", "ort-cpu"):
            if name in have and (name != "tensorrt" or engines.get("built")):
                return name
        raise BackendError("no backend available: pip install fastsam2[runtime]")
    if requested not in have:
        hint = "pip install fastsam2[trt]" if requested == "tensorrt" else "pip install onnxruntime-gpu"
        raise BackendError(f"backend '{requested}' is not available here ({hint}); available: {', '.join(have) or 'none'}")
    return requested


def create_sessions(bundle, backend: str, threads: int | None = None) -> dict:
    if backend == "tensorrt":
        from fastsam2.runtime.trt_backend import TensorRTSession, check_engine_compat

        engines = bundle.manifest.get("engines") or {}
        if not engines.get("built"):
            raise BackendError(f"bundle {bundle.path} has no TensorRT engines (target {bundle.manifest['target']})")
        check_engine_compat(engines)
        return {g: TensorRTSession(bundle.path / engines["graphs"][g]["file"]) for g in GRAPH_ORDER}
    providers = _ORT_PROVIDERS[backend]
    sessions = {g: OrtSession(bundle.graph_path(g), providers, threads) for g in GRAPH_ORDER}
    # the fused-attention variant runs on ORT's CPU and CUDA providers, not its TensorRT one
    fused = bundle.graph_path("memory_attention", ort_variant=True)
    if backend in ("ort-cpu", "ort-cuda") and fused != bundle.graph_path("memory_attention"):
        sessions["memory_attention"] = AttentionBySize(sessions["memory_attention"],
                                                       OrtSession(fused, providers, threads))
    return sessions


class AttentionBySize:
    """Memory attention through the fused-attention graph when the N x M attention is large,
    the plain one otherwise. Measured on 2 CPU cores at 1024 px (one call, plain vs fused):
    N x M = 4096 x 28672: 2.54 vs 2.12 s; 2868 x 21304: 1.31 vs 1.21 s; 2048 x 16384: 0.74 vs
    0.66 s; 1229 x 11470: 0.35 vs 0.40 s. Both graphs give the same result (1e-6)."""

    FUSED_FROM = 24_000_000  # N * M where the fused kernel starts to win

    def __init__(self, plain, fused):
        self.plain, self.fused = plain, fused
        self.input_names, self.output_names = plain.input_names, plain.output_names

    def run(self, feeds: dict) -> dict:
        work = feeds["curr"].shape[0] * feeds["memory"].shape[0]
        return (self.fused if work >= self.FUSED_FROM else self.plain).run(feeds)

