"""ONNX Runtime sessions for the backends ort-cpu, ort-cuda and ort-trt: session options (threads,
spinning, one shared CPU arena), the TensorRT provider's options and caches, the check that the
provider asked for is the one in use, and memory attention's fused/plain choice by size."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

from fastsam2.runtime import host
from fastsam2.runtime.contract import GRAPH_ORDER, dynamic_inputs, profile_shapes
from fastsam2.runtime.errors import BackendError


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
        opts.intra_op_num_threads = threads or host.usable_cpus()
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


class AttentionBySize:
    """Memory attention through the fused-attention graph when the N x M attention is large,
    the plain one otherwise; both give the same result (1e-6). The crossover comes from the
    committed measurement, bench/results/levers_1024px.json (`python bench/levers.py --bundle B
    --only attention`, 2 CPU cores): plain was faster at N x M = 14M, 34M and 61M, fused only at
    118M (keep 1.0), so fused starts between the last two. A test holds FUSED_FROM to that file:
    re-measure and commit the JSON before moving it."""

    FUSED_FROM = 100_000_000  # N * M where the fused kernel starts to win

    def __init__(self, plain, fused):
        self.plain, self.fused = plain, fused
        self.input_names, self.output_names = plain.input_names, plain.output_names
        self.precision, self.providers = plain.precision, plain.providers

    def run(self, feeds: dict) -> dict:
        work = feeds["curr"].shape[0] * feeds["memory"].shape[0]
        return (self.fused if work >= self.FUSED_FROM else self.plain).run(feeds)
