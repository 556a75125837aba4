"""`profile_bundle(...)`: time every graph of a bundle on synthetic inputs, per keep ratio.

The library behind fastsam2-profile. Inputs take the contract's shapes (runtime/contract.py)
with the memory bank full: the conditioning frame with all T tokens, memory_frames - 1 tracked
frames of k tokens each, and max_obj_ptrs object pointers of PTR_TOKENS tokens. Each iteration
runs one tracked frame's chain in Tracker.track's order (FRAME_ORDER: image encoder, router,
memory attention, mask decoder, then memory encoder on the decoded mask), so the per-graph
numbers carry the cache effects of the real loop (the report lists them in the contract's
GRAPH_ORDER). The frame time of an iteration is the sum of its graphs (the router only when
k < T, as in Tracker.track). Host-side numpy work (top-k, scatter, bank assembly, resizing) is
not timed.

The report dict is filled in place as keeps finish (`report=` lets a caller that is interrupted
keep the keeps measured so far), and `progress(done, total, label)` is called after every frame.
Frame counts default by backend (CPU_COUNTS / GPU_COUNTS): a 1024-px frame takes seconds on a
CPU, so the CPU default is a few frames per keep, the GPU one enough for stable percentiles.

Numpy only: matplotlib is imported inside `write_report`, for the plot alone.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from datetime import datetime, timezone

import numpy as np

from fastsam2 import __version__
from fastsam2.runtime import host
from fastsam2.runtime.backends import BACKENDS, check_threads, open_backend, pick_backend
from fastsam2.runtime.bundle import Bundle, load_bundle
from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, PTR_TOKENS, geometry, keep_to_k
from fastsam2.runtime.errors import InputError
from fastsam2.runtime.precision import CPU_BACKENDS
from fastsam2.runtime.prompts import parse_keeps

DEFAULT_KEEPS = (1.0, 0.7, 0.5, 0.3)
GPU_BACKENDS = tuple(b for b in BACKENDS if b != "auto" and b not in CPU_BACKENDS)
# (warm-up, timed) frames per keep when not given. At 1024 px on 2 cores (ort-cpu) a frame takes
# 2.0-4.0 s (docs/benchmarks.md, profiled with these counts): 1 + 5 frames x 4 keeps ~ 70 s;
# 5 + 50 took 15+ min per keep for a new user on a busy 2-core machine
CPU_COUNTS = (1, 5)
GPU_COUNTS = (5, 50)
# Tracker.track's order: the memory encoder encodes the mask the decoder just made
FRAME_ORDER = ("image_encoder", "router", "memory_attention", "mask_decoder", "memory_encoder")
assert sorted(FRAME_ORDER) == sorted(GRAPH_ORDER)


# -- inputs ----------------------------------------------------------------------------------
def bank_shapes(T: int, k: int, memory_frames: int, num_ptrs: int) -> dict:
    """N, Ms, M of memory attention with a full bank (the conditioning frame keeps all T)."""
    ms = T + (memory_frames - 1) * k
    return {"N": k, "Ms": ms, "M": ms + num_ptrs * PTR_TOKENS}


def synthetic_feeds(name: str, dims: dict, memory_frames: int = 1, seed: int = 0) -> dict:
    """Random inputs of graph `name` with the contract's shapes resolved from `dims`.

    Token indices are what the loop feeds: curr_idx sorted and distinct, memory_idx the
    conditioning frame's 0..T-1 followed by each remembered frame's sorted kept indices.
    The mask decoder gets a tracked frame's input: SAM2's one padding point (label -1).
    """
    rng = np.random.default_rng(seed)
    T = dims["T"]
    feeds = {}
    for t in GRAPHS[name].inputs:
        shape = tuple(t.resolve(dims))
        if any(isinstance(d, str) for d in shape):
            raise ValueError(f"{name}.{t.name}: unresolved symbols in {shape}")
        if t.dtype == "int64":
            continue
        feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    if name == "memory_attention":
        k = dims["N"]
        feeds["curr_idx"] = np.sort(rng.choice(T, size=k, replace=False)).astype(np.int64)
        parts = [np.arange(T, dtype=np.int64)]
        parts += [np.sort(rng.choice(T, size=k, replace=False)).astype(np.int64)
                  for _ in range(memory_frames - 1)]
        feeds["memory_idx"] = np.concatenate(parts)[: dims["Ms"]]
    elif name == "router":
        feeds["text_emb"] /= np.linalg.norm(feeds["text_emb"])
    elif name == "memory_encoder":
        feeds["object_score"] = np.ones((1, 1), np.float32)
        feeds["binarize"] = np.zeros(1, np.float32)
    elif name == "mask_decoder":
        feeds["point_coords"] = np.zeros((1, dims["P"], 2), np.float32)
        feeds["point_labels"] = -np.ones((1, dims["P"]), np.float32)
        feeds["mask_input"] = np.zeros_like(feeds["mask_input"])
        feeds["has_mask_input"] = np.zeros(1, np.float32)
    return feeds


# -- memory ----------------------------------------------------------------------------------
def _device_memory(backend: str) -> tuple:
    """(device MB in use, note). Native TensorRT: cudaMemGetInfo through polygraphy's libcudart,
    device-wide (other processes count too). ONNX Runtime's CUDA arena has no public query."""
    if backend not in GPU_BACKENDS:
        return None, None
    if backend == "tensorrt":
        try:
            import ctypes

            from fastsam2.runtime.trt_backend import _cudart

            lib = _cudart()
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            if lib is not None and lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
                return (round((total.value - free.value) / 2**20, 1),
                        "cudaMemGetInfo after the runs: device-wide memory in use, not a peak")
        except Exception:  # a measurement must never break the profile
            pass
        return None, "cudaMemGetInfo unavailable"
    return None, ("not measured: ONNX Runtime's CUDA provider exposes no device-memory query "
                  "(watch nvidia-smi while it runs)")


# -- machine ---------------------------------------------------------------------------------
def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def machine_info(backends=()) -> dict:
    """CPU model and cores, onnxruntime version and providers; GPU, driver and TensorRT when a
    GPU backend is profiled."""
    info = {
        "cpu_model": host.cpu_model(),
        "cpu_flags": host.cpu_features(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": host.usable_cpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    if any(b in GPU_BACKENDS for b in backends):
        from fastsam2.runtime.trt_backend import current_gpu, tensorrt_version

        gpu = current_gpu() or {}
        info.update(gpu_name=gpu.get("gpu_name"), gpu_compute_capability=gpu.get("compute_capability"),
                    gpu_driver=_nvidia_driver(), tensorrt=tensorrt_version())
    return info


# -- timing ----------------------------------------------------------------------------------
def _stats(samples_ms) -> dict:
    a = np.asarray(samples_ms, np.float64)
    return {"median_ms": round(float(np.median(a)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "min_ms": round(float(a.min()), 3), "mean_ms": round(float(a.mean()), 3), "samples": int(a.size)}


def frame_counts(backend: str, warmup: int | None = None, iters: int | None = None) -> tuple:
    """(warm-up, timed) frames per keep on `backend`: the ones given, else its default."""
    dw, di = GPU_COUNTS if backend in GPU_BACKENDS else CPU_COUNTS
    return (dw if warmup is None else warmup), (di if iters is None else iters)


def _check_args(keeps, warmup, iters, threads) -> tuple:
    keeps = parse_keeps(keeps)
    if iters is not None and iters < 1:
        raise InputError(f"--iters must be >= 1, got {iters}")
    if warmup is not None and warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {warmup}")
    check_threads(threads)  # 1..the usable CPUs: onnxruntime hangs at 1000 threads
    return keeps


def memory_frames_of(bundle, memory_frames: int | None) -> int:
    """--memory-frames, bounded by the bundle's num_maskmem: the tracking loop's bank never
    holds more frames, and each one more grows memory attention's inputs (100000 asked ~22 GB)."""
    most = int(bundle.settings["num_maskmem"])
    if memory_frames is None:
        return most
    if not 1 <= memory_frames <= most:
        raise InputError(f"--memory-frames must be in 1..{most} (the conditioning frame included; the "
                         f"bundle's memory bank holds at most num_maskmem = {most} frames), got {memory_frames}")
    return memory_frames


def plan_profile(bundle_dir, backend="auto", keeps=DEFAULT_KEEPS, memory_frames: int | None = None,
                 warmup: int | None = None, iters: int | None = None, threads: int | None = None) -> dict:
    """Every setting checked against the bundle and this machine before anything runs:
    {"bundle", "backends" (requested names, one per backend they resolve to), "keeps",
    "memory_frames", "warmup", "iters", "threads"}. `keeps`: a sequence, or comma-separated
    text as fastsam2-profile's --keep."""
    keeps = _check_args(keeps, warmup, iters, threads)
    names = backend.split(",") if isinstance(backend, str) else list(backend)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError("give a backend")
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else load_bundle(bundle_dir)
    chosen = {}
    for n in names:  # all checked before timing; one run per backend they resolve to
        chosen.setdefault(pick_backend(n, bundle), n)
    return {"bundle": bundle, "backends": list(chosen.values()), "keeps": keeps,
            "memory_frames": memory_frames_of(bundle, memory_frames), "warmup": warmup, "iters": iters,
            "threads": threads}


def _profile_keep(sessions, dims, k, memory_frames, warmup, iters, seed, tick=None) -> dict:
    T = dims["T"]
    d = dict(dims, **bank_shapes(T, k, memory_frames, dims["ptrs"]))
    feeds = {g: synthetic_feeds(g, d, memory_frames, seed) for g in GRAPH_ORDER}
    in_frame = {g: g != "router" or k < T for g in GRAPH_ORDER}
    samples = {g: [] for g in GRAPH_ORDER}
    frame = []
    for it in range(warmup + iters):
        lat = {}
        for g in FRAME_ORDER:
            t0 = time.perf_counter()
            sessions[g].run(feeds[g])
            lat[g] = (time.perf_counter() - t0) * 1e3
        if it >= warmup:
            for g in GRAPH_ORDER:
                samples[g].append(lat[g])
            frame.append(sum(v for g, v in lat.items() if in_frame[g]))
        if tick:
            tick(it + 1, warmup + iters)
    graphs = {g: {**_stats(samples[g]), "in_frame": in_frame[g],
                  "inputs": {n: list(a.shape) for n, a in feeds[g].items()}} for g in GRAPH_ORDER}
    fstats = _stats(frame)
    fstats["fps"] = round(1e3 / fstats["median_ms"], 3) if fstats["median_ms"] > 0 else None
    return {"k": k, "shapes": {s: d[s] for s in ("N", "Ms", "M")}, "graphs": graphs, "frame": fstats}


NOTES = [
    "synthetic inputs with the contract's shapes; one tracked frame's chain per iteration",
    "frame = image_encoder + router (only when k < T) + memory_attention + memory_encoder"
    " + mask_decoder, summed per iteration; host-side numpy work is not included",
    "share = a graph's median over the sum of the in-frame graphs' medians (what latency.png stacks); "
    "the frame median (median of per-frame sums) differs from that sum by the noise between frames",
    "memory attention sees a full bank: N = k, Ms = T + (memory_frames - 1) k, "
    "M = Ms + object_pointers * 4",
    "peak RSS per keep starts from the RSS left by the keeps before it (ONNX Runtime's CPU "
    "arena keeps what it allocated): for one keep's own peak, profile that keep alone",
]


def profile_bundle(bundle_dir, backend="ort-cpu", keeps=DEFAULT_KEEPS, memory_frames: int | None = None,
                   warmup: int | None = None, iters: int | None = None, threads: int | None = None,
                   seed: int = 0, log=None, progress=None, report: dict | None = None) -> dict:
    """Time each graph of the bundle at each keep ratio with a full memory bank.

    `backend` is one name or several (a sequence, or comma-separated); "auto" resolves as in
    fastsam2-run. `memory_frames` defaults to the bundle's num_maskmem, `warmup`/`iters` to
    frame_counts(backend). Returns the report dict that `write_report` writes; `report`, when
    given, is that dict filled in place ("status" "running" until the last keep is done).
    """
    plan = plan_profile(bundle_dir, backend, keeps, memory_frames, warmup, iters, threads)
    bundle, keeps, memory_frames = plan["bundle"], plan["keeps"], plan["memory_frames"]
    m, s = bundle.manifest, bundle.settings
    dims = geometry(int(m["image_size"]), int(s.get("text_dim", 512)))
    # one object per call (B: the batched graphs' objects), one prompt point
    dims.update(B=1, P=1, ptrs=int(s.get("max_obj_ptrs_in_encoder", 16)))
    T, floor = dims["T"], int(m.get("keep_floor", 64))
    report = {} if report is None else report
    report.update({
        "tool": "fastsam2-profile",
        "fastsam2_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "bundle": {"path": str(bundle.path), **bundle.summary()},
        "machine": machine_info(),
        "settings": {"backends": [], "keeps": list(keeps), "memory_frames": memory_frames,
                     "object_pointers": dims["ptrs"], "warmup": warmup, "iters": iters,
                     "threads": threads, "seed": seed, "keep_floor": floor},
        "geometry": {"image_size": dims["S"], "grid": dims["G"], "tokens": T},
        "notes": list(NOTES),
        "results": [],
    })
    ran, sess_info = report["settings"]["backends"], {}
    for requested in plan["backends"]:
        b, sessions = open_backend(requested, bundle, threads, warn=log)
        ran.append(b)  # what actually runs: `auto` may fall back from the backend it resolved to
        sess_info[b] = sorted({p for sess in sessions.values() for p in getattr(sess, "providers", [b])})
        report["machine"] = machine_info(ran) | {"session_providers": sess_info}
        nw, ni = frame_counts(b, warmup, iters)
        for keep in keeps:
            k = keep_to_k(keep, T, floor)
            rss_before = host.rss_mb()
            scoped = host.reset_peak_rss()
            label = f"{b} keep {keep:g}"
            if log:
                log(f"{label}: k = {k}/{T}, {nw} warm-up + {ni} timed frames")
            tick = (lambda done, total, label=label: progress(done, total, label)) if progress else None
            r = _profile_keep(sessions, dims, k, memory_frames, nw, ni, seed, tick)
            dev, note = _device_memory(b)
            report["results"].append({
                "backend": b, "keep": keep, "warmup": nw, "iters": ni, **r,
                "memory": {"peak_rss_mb": host.peak_rss_mb(),
                           "rss_before_mb": rss_before or None,
                           "peak_rss_scope": "this keep (VmHWM reset before it)" if scoped
                           else "whole process so far",
                           "device_mb": dev, "device_note": note}})
        del sessions
    report["status"] = "complete"
    return report
