"""Backends: ONNX Runtime (CPU, CUDA, TensorRT EP), OpenVINO and native TensorRT engines.

Every backend gives one session per graph with `.run(feeds) -> {output: array}`, which is all
the tracking loop needs. On the CPU backends (ort-cpu, openvino) each graph also runs in a
precision: fp32 (the exported graph), int8 (a quantised variant file in the bundle) or bf16 (a
runtime hint, only where the CPU has bf16); the bundle records which one export picked per graph
(manifest["precision"]), FASTSAM2_PRECISION or `precision=` overrides it.
"""

from __future__ import annotations

import logging
import os

from fastsam2.runtime import host
from fastsam2.runtime.contract import GRAPH_ORDER
from fastsam2.runtime.bundle import sha256_file
from fastsam2.runtime.errors import BackendError, BundleError, InputError
from fastsam2.runtime.precision import graph_precisions, variant_path

_log = logging.getLogger(__name__)

# the ONNX Runtime side, importable from here as before
from .ort_backend import (AttentionBySize, OrtSession, _check_provider, _ort_trt_cache_dir,  # noqa: F401
                          bundle_profile_shapes, ort_trt_options)

# ONNX Runtime's telemetry is opted out in fastsam2/runtime/__init__.py, before any import of it

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "openvino")

_ORT_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def default_threads() -> int:
    return host.usable_cpus()


def check_threads(threads) -> int | None:
    """`--threads` within 1..the CPUs this process may use (None: all of them).

    Refused rather than clamped: a thread count above the machine's is a command copied from
    a bigger machine (or a typo), and a run that silently used fewer threads than it reports
    makes timings lie; onnxruntime itself hangs at 1000 threads and crashes at 100000."""
    if threads is None:
        return None
    have = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= have:
        raise InputError(f"--threads must be in 1..{have} (the CPUs this process may use), got {threads}")
    return threads


def _gpu_visible() -> bool:
    from fastsam2.runtime.trt_backend import current_gpu

    return current_gpu() is not None


def _ort_backends() -> list:
    """The ONNX Runtime backends this onnxruntime build has (GPU or not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    prov = ort.get_available_providers()
    return ["ort-cpu"] + [b for b in ("ort-cuda", "ort-trt") if _ORT_PROVIDERS[b][0] in prov]


def available_backends() -> list:
    """Backends that can run here. onnxruntime-gpu lists its CUDA and TensorRT providers on
    any machine, GPU or not, so those count only where a CUDA GPU is visible."""
    found = _ort_backends()
    if len(found) > 1 and not _gpu_visible():
        found = found[:1]
    from fastsam2.runtime.trt_backend import tensorrt_available

    if tensorrt_available():
        found.append("tensorrt")
    from fastsam2.runtime.openvino_backend import openvino_available

    if openvino_available():
        found.append("openvino")
    return found


def _candidates(requested: str, bundle) -> list:
    """The backends to try, in order: `auto` lists every usable one, best first."""
    if requested not in BACKENDS:
        raise InputError(f"unknown backend '{requested}'; choose from {', '.join(BACKENDS)}")
    have = available_backends()
    if requested == "auto":
        engines = bundle.engines
        # OpenVINO before ONNX Runtime's CPU provider only for a target that asks for it (the
        # intel-* ones): on this project's AMD CPU it was not faster (docs/benchmarks.md)
        cpu = (["openvino", "ort-cpu"] if (bundle.manifest.get("openvino") or {}).get("preferred")
               else ["ort-cpu", "openvino"])
        order = [n for n in ("tensorrt", "ort-trt", "ort-cuda", *cpu)
                 if n in have and (n != "tensorrt" or engines.get("built"))]
        if not order:
            raise BackendError("no backend available: pip install fastsam2[runtime]")
        return order
    if requested in ("ort-cuda", "ort-trt") and requested in _ort_backends():
        # asked for by name: try it even where no GPU was detected (a Jetson without nvidia-smi
        # queries, CUDA libraries only inside pip wheels); create_sessions checks it started
        return [requested]
    if requested not in have:
        if requested == "tensorrt":
            hint = "pip install fastsam2[trt] and an NVIDIA GPU"
        elif requested == "openvino":
            hint = "pip install fastsam2[openvino]"
        else:
            hint = "pip install onnxruntime-gpu and an NVIDIA GPU"
        raise BackendError(f"backend '{requested}' is not available here ({hint}); "
                           f"available: {', '.join(have) or 'none'}")
    return [requested]


def pick_backend(requested: str, bundle) -> str:
    """The backend `requested` resolves to here (the first one `auto` would try)."""
    return _candidates(requested, bundle)[0]


def open_backend(requested: str, bundle, threads: int | None = None, warn=None,
                 precision: str | None = None) -> tuple:
    """(backend name, sessions). `auto` falls back to the next backend when one fails to start
    (onnxruntime-gpu without its CUDA libraries; engines built for another GPU or TensorRT, or
    changed since), and says so; a named backend does not. `precision` overrides the bundle's
    CPU precisions (see graph_precisions); each session's `.precision` says what it runs.
    `warn`: where its lines go (default: this module's logger, at warning level)."""
    warn = warn or _log.warning
    check_threads(threads)
    order = _candidates(requested, bundle)
    for i, name in enumerate(order):
        try:
            if requested == "auto" and name in CPU_MIX and "openvino" in order:
                moved = openvino_graphs(bundle, precision)
                if moved:
                    return _mixed_sessions(bundle, moved, threads, precision, warn)
            return name, create_sessions(bundle, name, threads, precision=precision, warn=warn)
        except (BackendError, BundleError) as e:
            if i + 1 == len(order):
                raise
            warn(f"warning: {e}; falling back to {order[i + 1]}")
    raise AssertionError("unreachable")


CPU_MIX = ("ort-cpu",)  # where `auto` may hand single graphs to OpenVINO
MIXED = "ort-cpu+openvino"  # the backend name a run reports when it does


def openvino_graphs(bundle, precision: str | None = None) -> dict:
    """{graph: precision} of the graphs whose chosen CPU precision ONNX Runtime cannot run here
    and OpenVINO can (a bf16 encoder picked on an AVX512-BF16 CPU): `auto` runs those on
    OpenVINO and the rest on ONNX Runtime, rather than dropping them to fp32."""
    quiet = lambda m: None  # noqa: E731
    ort = graph_precisions(bundle, "ort-cpu", precision, quiet)
    ov = graph_precisions(bundle, "openvino", precision, quiet)
    return {g: ov[g] for g in GRAPH_ORDER if ort[g] == "fp32" and ov[g] != "fp32"}


def _mixed_sessions(bundle, moved: dict, threads, precision, warn) -> tuple:
    ort = create_sessions(bundle, "ort-cpu", threads, precision=precision, warn=warn,
                          graphs=[g for g in GRAPH_ORDER if g not in moved])
    ov = _openvino_sessions(bundle, threads, moved, graphs=list(moved), log=warn)
    warn(f"backend auto: {', '.join(f'{g} {p}' for g, p in moved.items())} on openvino (ONNX Runtime runs "
         f"no {'/'.join(sorted(set(moved.values())))} {'graph' if len(moved) == 1 else 'graphs'} here), "
         "the other graphs on ort-cpu")
    return MIXED, {g: (ov.get(g) or ort[g]) for g in GRAPH_ORDER}


def create_sessions(bundle, backend: str, threads: int | None = None, precision: str | None = None,
                    warn=None, graphs=None) -> dict:
    """{graph: session} on `backend`, for every graph or those in `graphs`."""
    warn = warn or _log.warning
    threads = check_threads(threads)
    graphs = list(GRAPH_ORDER if graphs is None else graphs)
    if backend == "openvino":
        return _openvino_sessions(bundle, threads, graph_precisions(bundle, backend, precision, warn), graphs, log=warn)
    if backend == "tensorrt":
        from fastsam2.runtime.trt_backend import TensorRTSession, check_engine_compat

        engines = bundle.engines
        if not engines.get("built"):
            target = engines.get("target", bundle.manifest["target"])
            hint = (f"; build them on this device with bash {bundle.file(engines['build_plan'], 'build plan')}"
                    if engines.get("build_plan") else "")
            raise BackendError(f"bundle {bundle.path} has no TensorRT engines (target {target}){hint}")
        check_engine_compat(engines)
        for g in GRAPH_ORDER:
            f, digest = bundle.engine_file(g), engines["graphs"][g].get("sha256")
            if not f.is_file():
                raise BundleError(f"TensorRT engine missing: {f}")
            if digest and sha256_file(f) != digest:
                raise BundleError(f"TensorRT engine {f} changed since it was recorded (sha256 mismatch): "
                                  "build and record it again")
        dla = int(engines.get("dla_core", -1))
        return {g: TensorRTSession(bundle.engine_file(g), dla_core=dla) for g in GRAPH_ORDER}
    if backend not in _ORT_PROVIDERS:
        raise InputError(f"unknown backend '{backend}'; choose from {', '.join(BACKENDS)}")
    cache = _ort_trt_cache_dir(bundle) if backend == "ort-trt" else None
    said = []
    precisions = graph_precisions(bundle, backend, precision, said.append)
    for line in said:  # the fp32 fallbacks of the graphs opened here (another backend runs the rest)
        if any(line.startswith(f"warning: {g} ") for g in graphs) or not line.startswith("warning: "):
            warn(line)
    sessions = {}
    for g in graphs:
        providers = list(_ORT_PROVIDERS[backend])
        if backend == "ort-trt":
            providers[0] = (providers[0], ort_trt_options(bundle, g, cache))
        sessions[g] = OrtSession(variant_path(bundle, g, precisions[g]), providers, threads,
                                 precision=precisions[g])
        _check_provider(sessions[g], _ORT_PROVIDERS[backend][0], g)
    # the fused-attention variant runs on ORT's CPU and CUDA providers, not its TensorRT one
    fused = bundle.graph_path("memory_attention", ort_variant=True)
    if (backend in ("ort-cpu", "ort-cuda") and "memory_attention" in sessions
            and fused != bundle.graph_path("memory_attention") and precisions["memory_attention"] == "fp32"):
        providers = _ORT_PROVIDERS[backend]
        sessions["memory_attention"] = AttentionBySize(sessions["memory_attention"],
                                                       OrtSession(fused, providers, threads))
    return sessions


def _openvino_sessions(bundle, threads, precisions: dict, graphs=GRAPH_ORDER, log=None) -> dict:
    from fastsam2.runtime.contract import GRAPHS
    from fastsam2.runtime.openvino_backend import (DEVICES, OpenVINOSession, cache_dir, devices,
                                                   graph_device)

    ov = bundle.manifest.get("openvino") or {}
    device = (os.environ.get("FASTSAM2_OPENVINO_DEVICE") or ov.get("device") or "CPU").upper()
    if device not in DEVICES:
        raise InputError(f"OpenVINO device {device!r}: use one of {', '.join(DEVICES)}")
    have = devices()
    base = ov.get("precision", "fp32")  # what fp32 graphs run in off the CPU (NPUs: fp16)
    sessions = {}
    for g in graphs:
        dev = graph_device(device, bool(GRAPHS[g].dynamic))
        if dev != "AUTO" and not any(d.split(".")[0] == dev for d in have):
            raise BackendError(f"OpenVINO has no {dev} device here (it has: {', '.join(have) or 'none'})")
        prec = precisions[g] if dev == "CPU" or precisions[g] != "fp32" else base
        path = variant_path(bundle, g, precisions[g])
        sessions[g] = OpenVINOSession(path, dev, threads, prec, log=log,
                                      cache=cache_dir(bundle.manifest["graphs"][g]["sha256"]))
    return sessions
