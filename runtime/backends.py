"""Backends: ONNX Runtime (CPU, CUDA, TensorRT EP), OpenVINO and native TensorRT engines.

Every backend gives one session per graph with `.run(feeds) -> {output: array}`, which is all
the tracking loop needs. On the CPU backends (ort-cpu, openvino) each graph also runs in a
precision: fp32 (the exported graph), int8 (a quantised variant file in the bundle) or bf16 (a
runtime hint, only where the CPU has bf16); the bundle records which one export picked per graph
(manifest["precision"]), FASTSAM2_PRECISION or `precision=` overrides it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

from fastsam2.runtime import host
from fastsam2.runtime.contract import GRAPH_ORDER, dynamic_inputs, profile_shapes
from fastsam2.runtime.bundle import sha256_file
from fastsam2.runtime.errors import BackendError, BundleError, InputError
from fastsam2.runtime.precision import graph_precisions, variant_path

# ONNX Runtime's telemetry is opted out in fastsam2/runtime/__init__.py, before any import of it

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "openvino")

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


_TELEMETRY_OFF = False
ORT_SPIN = "run"  # intra-op threads: "on" spin, "off" never, "run" only within a run (bench/levers.py chain)


def _telemetry_off(ort) -> None:
    """ONNX Runtime's telemetry events off, for builds that ignore the variables above (Windows: ETW)."""
    global _TELEMETRY_OFF
    if not _TELEMETRY_OFF:
        with contextlib.suppress(Exception):
            ort.disable_telemetry_events()
        _TELEMETRY_OFF = True


class OrtSession:
    def __init__(self, path, providers, threads: int | None = None, profile_dir=None, precision: str = "fp32"):
        import onnxruntime as ort

        _telemetry_off(ort)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if first == "CPUExecutionProvider" and _share_cpu_arena(ort):
            opts.add_session_config_entry("session.use_env_allocators", "1")
        # each graph has its own intra-op pool; a pool whose run just ended spins for more work
        # while the next graph of the frame runs, and on a small CPU those spinning threads take
        # the cores from it. "run": spin between the operators of a run, stop when it ends
        # (bench/levers.py chain, 2 cores, 256 px: 417 -> 285 ms per frame; 1024 px: within
        # the run-to-run spread of +-4 %: the encoder's ~3 s per frame dwarf the spin)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if ORT_SPIN == "off" else "1")
        if ORT_SPIN == "run":
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.log_severity_level = 3  # shape-merge warnings of the exported Hiera are harmless
        if precision == "bf16":  # MLAS's bf16 GEMMs (ARM64 only; checked by graph_precisions)
            opts.add_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "1")
        self.precision = precision
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile_dir)
        # onnxruntime print()s an "EP Error" banner when a provider fails and it falls back:
        # keep it off the user's stdout and keep its reason for our own one-line error
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            try:
                self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # a graph ONNX Runtime cannot load: one line, not its C++ trace
                from fastsam2.runtime.bundle_files import describe_graph_error

                raise describe_graph_error(path, e) from None
        self.fallback_reason = next((ln.split("EP Error", 1)[1].lstrip(": ").split(" when using")[0]
                                     for ln in captured.getvalue().splitlines()
                                     if ln.startswith("EP Error")), None)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def run(self, feeds: dict) -> dict:
        outs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))


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


def open_backend(requested: str, bundle, threads: int | None = None, warn=print,
                 precision: str | None = None) -> tuple:
    """(backend name, sessions). `auto` falls back to the next backend when one fails to start
    (onnxruntime-gpu without its CUDA libraries; engines built for another GPU or TensorRT, or
    changed since), and says so; a named backend does not. `precision` overrides the bundle's
    CPU precisions (see graph_precisions); each session's `.precision` says what it runs."""
    check_threads(threads)
    order = _candidates(requested, bundle)
    for i, name in enumerate(order):
        try:
            return name, create_sessions(bundle, name, threads, precision=precision, warn=warn)
        except (BackendError, BundleError) as e:
            if i + 1 == len(order):
                raise
            warn(f"warning: {e}; falling back to {order[i + 1]}")
    raise AssertionError("unreachable")


def _ort_trt_cache_dir(bundle) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps its engines: beside the bundle's own, or in
    the user cache when the bundle is read-only (a mounted model store)."""
    here = bundle.file("engines/ort-trt", "ONNX Runtime TensorRT cache folder")
    try:
        here.mkdir(parents=True, exist_ok=True)
        probe = here / ".write-test"
        probe.touch()
        probe.unlink()
        return here
    except OSError:
        tag = bundle.manifest["graphs"]["memory_attention"]["sha256"][:12]
        alt = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastsam2" / "ort-trt" / tag
        alt.mkdir(parents=True, exist_ok=True)
        return alt


def bundle_profile_shapes(bundle) -> dict:
    """{graph: {input: (min, opt, max)}} of the dynamic inputs, as the bundle's engines were
    (or would be) built: the export's TensorRT profile, or for an ONNX-only bundle the whole
    keep range down to the keep floor."""
    engines = bundle.engines
    if engines.get("profile_shapes"):
        return {g: {n: tuple(tuple(x) for x in v) for n, v in d.items()}
                for g, d in engines["profile_shapes"].items()}
    m, st = bundle.manifest, bundle.settings
    t = m["token_grid"][0] * m["token_grid"][1]
    keep = m["keep"] if isinstance(m["keep"], (int, float)) else 0.5
    shapes = profile_shapes(m["image_size"], min(1.0, m.get("keep_floor", 64) / t), keep, 1.0,
                            st["num_maskmem"], st["max_obj_ptrs_in_encoder"], st["text_dim"],
                            engines.get("max_points", 8))
    return {g: {n: shapes[g][n] for n in dynamic_inputs(g)} for g in GRAPH_ORDER if dynamic_inputs(g)}


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def ort_trt_options(bundle, graph: str, cache_dir) -> dict:
    """TensorrtExecutionProvider options for one graph: the optimisation profile of the
    dynamic inputs (without it the provider rebuilds its engine whenever N or M grow past what
    it has seen: nearly every frame while the memory bank fills), the target's precision,
    workspace and DLA core, and on-disk engine + timing caches so the build happens once."""
    engines = bundle.engines
    precision = engines.get("precision", "fp32")
    opts = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_fp16_enable": precision in ("fp16", "int8"),
    }
    if engines.get("workspace_mib"):
        opts["trt_max_workspace_size"] = int(engines["workspace_mib"]) << 20
    if engines.get("builder_optimization_level") is not None:
        opts["trt_builder_optimization_level"] = int(engines["builder_optimization_level"])
    if engines.get("dla_core", -1) >= 0:
        opts.update(trt_dla_enable=True, trt_dla_core=int(engines["dla_core"]))
    if precision == "int8":
        # the provider reads the table from its cache folder (TensorRT's own format)
        calib = bundle.calibration_cache(graph, engines["target"])
        if calib.is_file():
            (Path(cache_dir) / calib.name).write_bytes(calib.read_bytes())
            opts.update(trt_int8_enable=True, trt_int8_use_native_calibration_table=True,
                        trt_int8_calibration_table_name=calib.name)
    shapes = bundle_profile_shapes(bundle).get(graph)
    if shapes:
        for i, which in enumerate(("min", "opt", "max")):
            opts[f"trt_profile_{which}_shapes"] = ",".join(f"{n}:{_dims(s[i])}" for n, s in shapes.items())
    return opts


def _check_provider(session: OrtSession, wanted: str, graph: str) -> None:
    # onnxruntime drops a provider it cannot load (missing CUDA/cuDNN/TensorRT libraries) and
    # quietly runs on the CPU: refuse instead of reporting a GPU backend that is not in use
    if wanted not in session.providers:
        reason = getattr(session, "fallback_reason", None)
        why = (f"onnxruntime says: {_short(reason)}" if reason else
               "its CUDA/cuDNN/TensorRT libraries or the GPU are missing")
        raise BackendError(
            f"onnxruntime could not start {wanted} for {graph} (it runs on "
            f"{', '.join(session.providers)}): {why}; install them or use --backend ort-cpu"
        )


def _short(text: str, limit: int = 200) -> str:
    # onnxruntime's reasons carry source paths ("/onnxruntime_src/...cc:729 void f(...) Please ...")
    # and the C++ signature of the function that failed, before the sentence meant for users
    text = " ".join(w for w in text.split() if not w.startswith("/onnxruntime_src"))
    sig = re.search(r"::\w+\(.*?\)\s+(?=[A-Z])", text)
    if sig:
        text = text[sig.end():]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def create_sessions(bundle, backend: str, threads: int | None = None, precision: str | None = None,
                    warn=print) -> dict:
    threads = check_threads(threads)
    if backend == "openvino":
        return _openvino_sessions(bundle, threads, graph_precisions(bundle, backend, precision, warn))
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
    precisions = graph_precisions(bundle, backend, precision, warn)
    sessions = {}
    for g in GRAPH_ORDER:
        providers = list(_ORT_PROVIDERS[backend])
        if backend == "ort-trt":
            providers[0] = (providers[0], ort_trt_options(bundle, g, cache))
        sessions[g] = OrtSession(variant_path(bundle, g, precisions[g]), providers, threads,
                                 precision=precisions[g])
        _check_provider(sessions[g], _ORT_PROVIDERS[backend][0], g)
    # the fused-attention variant runs on ORT's CPU and CUDA providers, not its TensorRT one
    fused = bundle.graph_path("memory_attention", ort_variant=True)
    if (backend in ("ort-cpu", "ort-cuda") and fused != bundle.graph_path("memory_attention")
            and precisions["memory_attention"] == "fp32"):
        providers = _ORT_PROVIDERS[backend]
        sessions["memory_attention"] = AttentionBySize(sessions["memory_attention"],
                                                       OrtSession(fused, providers, threads))
    return sessions


def _openvino_sessions(bundle, threads, precisions: dict) -> dict:
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
    for g in GRAPH_ORDER:
        dev = graph_device(device, bool(GRAPHS[g].dynamic))
        if dev != "AUTO" and not any(d.split(".")[0] == dev for d in have):
            raise BackendError(f"OpenVINO has no {dev} device here (it has: {', '.join(have) or 'none'})")
        prec = precisions[g] if dev == "CPU" or precisions[g] != "fp32" else base
        path = variant_path(bundle, g, precisions[g])
        sessions[g] = OpenVINOSession(path, dev, threads, prec,
                                      cache=cache_dir(bundle.manifest["graphs"][g]["sha256"]))
    return sessions


class AttentionBySize:
    """Memory attention through the fused-attention graph when the N x M attention is large,
    the plain one otherwise. Measured on 2 CPU cores at 1024 px (one call, plain vs fused):
    N x M = 4096 x 28672: 2.54 vs 2.12 s; 2868 x 21304: 1.31 vs 1.21 s; 2048 x 16384: 0.74 vs
    0.66 s; 1229 x 11470: 0.35 vs 0.40 s. Both graphs give the same result (1e-6). Those figures
    predate a committed script: `python bench/levers.py --bundle B --only attention` re-measures
    the crossover (bench/results/levers_<S>px.json) before FUSED_FROM is moved."""

    FUSED_FROM = 24_000_000  # N * M where the fused kernel starts to win

    def __init__(self, plain, fused):
        self.plain, self.fused = plain, fused
        self.input_names, self.output_names = plain.input_names, plain.output_names
        self.precision, self.providers = plain.precision, plain.providers

    def run(self, feeds: dict) -> dict:
        work = feeds["curr"].shape[0] * feeds["memory"].shape[0]
        return (self.fused if work >= self.FUSED_FROM else self.plain).run(feeds)

