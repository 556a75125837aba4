"""Levers measured on the bundle's graphs, each against its baseline in the same process with
the runs interleaved (a shared CPU's load hits both alike), written to one JSON:

    python bench/levers.py --bundle B [--reps 5] [--threads 2]   # B: a bundle at 1024 px

- encoder_ops:  ONNX Runtime's per-operator profile of the image encoder (share of kernel time
                per op type), the figure behind "the encoder is compute-bound MLAS kernels";
- attention:    memory attention, plain graph vs the fused-attention ONNX Runtime variant, at the
                N x M of keep 0.3 / 0.5 / 0.7 / 1.0 with a full bank: the crossover behind
                AttentionBySize.FUSED_FROM;
- encoder_precision: the image encoder in every precision the bundle carries (ONNX Runtime and
                OpenVINO), speed vs ort-cpu fp32 and output error;
- session:      image encoder under ONNX Runtime session options (graph optimisation level,
                a saved optimised model, thread spinning) and OpenVINO CPU pinning;
- chain:        whole frames (the five graphs one after another, a Session on a generated video)
                with ONNX Runtime's intra-op threads spinning always ("on"), never ("off"), or
                within a run and stopped after it ("run"): one graph alone does not show what
                the pools of the other graphs cost it.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def ort_session(path, threads, **opt):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    o.graph_optimization_level = opt.pop("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for k, v in opt.pop("config", {}).items():
        o.add_session_config_entry(k, v)
    if opt.get("save"):
        o.optimized_model_filepath = str(opt["save"])
    if opt.get("profile"):
        o.enable_profiling = True
        o.profile_file_prefix = str(opt["profile"])
    t0 = time.perf_counter()
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return s, round(time.perf_counter() - t0, 2)


def interleave(fns: dict, reps: int) -> dict:
    """Median ms per call of each fn, calls interleaved (one warm-up each first)."""
    for f in fns.values():
        f()
    t = {k: [] for k in fns}
    for i in range(reps):
        names = list(fns)
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            t[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": round(float(np.median(v)), 1), "runs_ms": [round(x, 1) for x in v]} for k, v in t.items()}


def encoder_ops(bundle, image, threads, work: Path) -> dict:
    s, _ = ort_session(bundle.graph_path("image_encoder"), threads, profile=work / "enc")
    for _ in range(3):
        s.run(None, {"image": image})
    prof = json.loads(Path(s.end_profiling()).read_text())
    by_op = {}
    for e in prof:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            by_op[op] = by_op.get(op, 0) + e["dur"]
    total = sum(by_op.values())
    return {"runs": 3, "share": {k: round(v / total, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "total_kernel_ms_per_run": round(total / 3 / 1e3, 1)}


def attention(bundle, threads, reps) -> dict:
    from fastsam2.runtime.contract import PTR_TOKENS, keep_to_k

    plain, _ = ort_session(bundle.graph_path("memory_attention"), threads)
    fused, _ = ort_session(bundle.graph_path("memory_attention", ort_variant=True), threads)
    G = bundle.manifest["token_grid"][0]
    T, nm = G * G, bundle.settings["num_maskmem"]
    ptrs = bundle.settings["max_obj_ptrs_in_encoder"]
    rng = np.random.default_rng(0)
    out = {}
    for keep in (0.3, 0.5, 0.7, 1.0):
        n = keep_to_k(keep, T)
        ms = T + (nm - 1) * n  # conditioning frame + 6 pruned memories: the full bank
        m = ms + PTR_TOKENS * ptrs
        f = {"curr": rng.standard_normal((n, 256), np.float32), "curr_pos": rng.standard_normal((n, 256), np.float32),
             "curr_idx": np.sort(rng.choice(T, n, replace=False)).astype(np.int64),
             "memory": rng.standard_normal((m, 64), np.float32), "memory_pos": rng.standard_normal((m, 64), np.float32),
             "memory_idx": rng.integers(0, T, ms).astype(np.int64)}
        a, b = plain.run(None, f)[0], fused.run(None, f)[0]
        r = interleave({"plain": lambda: plain.run(None, f), "fused": lambda: fused.run(None, f)}, reps)
        out[f"keep_{keep}"] = {"N": n, "M": m, "NxM": n * m, **r, "max_abs_diff": float(np.abs(a - b).max())}
    return out


def session_levers(bundle, image, threads, reps, work: Path) -> dict:
    import onnxruntime as ort

    enc = bundle.graph_path("image_encoder")
    L = ort.GraphOptimizationLevel
    saved = work / "encoder_optimised.onnx"
    cfg, created = {}, {}
    for name, kw in {"all (default)": {}, "extended": {"level": L.ORT_ENABLE_EXTENDED},
                     "basic": {"level": L.ORT_ENABLE_BASIC},
                     "no spinning": {"config": {"session.intra_op.allow_spinning": "0"}}}.items():
        s, created[name] = ort_session(enc, threads, **kw)
        cfg[name] = (lambda s=s: s.run(None, {"image": image}))
    ort_session(enc, threads, save=saved)
    s, created["saved optimised model"] = ort_session(saved, threads, level=L.ORT_DISABLE_ALL)
    cfg["saved optimised model"] = lambda: s.run(None, {"image": image})
    try:
        from fastsam2.runtime.openvino_backend import import_openvino

        ov = import_openvino()
        core = ov.Core()
        for pin in (True, False):
            c = core.compile_model(str(enc), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                     "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                                     "ENABLE_CPU_PINNING": pin})
            req = c.create_infer_request()
            cfg[f"openvino, pinning {'on' if pin else 'off'}"] = (lambda req=req: req.infer({0: image}))
    except ImportError:
        pass
    res = interleave(cfg, reps)
    for k, v in created.items():
        res[k]["session_create_s"] = v
    return res


def chain(bundle, threads, reps, work: Path, frames: int = 8) -> dict:
    from fastsam2.calibration.synthetic import make_video
    from fastsam2.runtime import ort_backend
    from fastsam2.runtime.session import Session
    from fastsam2.runtime.video import open_frames

    vid = make_video(work / "chain", num_frames=frames, size=(240, 320), seed=0, fmt="jpg")
    with open_frames(vid.frames_dir_or_file) as src:
        rgbs = [rgb for _, rgb in src]
    sessions = {}
    default = ort_backend.ORT_SPIN
    for spin in ("on", "off", "run"):  # spinning always / never / within a run, stopped after it
        ort_backend.ORT_SPIN = spin
        sessions[spin] = Session.open(bundle, backend="ort-cpu", threads=threads, warn=lambda m: None)
    ort_backend.ORT_SPIN = default

    def video(s):
        s.reset()
        s.add_prompt(1, frame=0, points=[vid.first_frame_points[1]])
        for rgb in rgbs:
            s.push(rgb)

    res = interleave({k: (lambda s=s: video(s)) for k, s in sessions.items()}, reps)
    for v in res.values():
        v["ms_per_frame"] = round(v["median_ms"] / frames, 1)
    res["frames"] = frames
    res["runtime_default"] = default
    return res


def encoder_precision(bundle, image, threads, reps) -> dict:
    """The image encoder in each precision the bundle carries, ONNX Runtime and OpenVINO,
    interleaved; plus each one's max |diff| / max |fp32| per output."""
    from fastsam2.runtime.backends import OrtSession
    from fastsam2.runtime.openvino_backend import OpenVINOSession, openvino_available
    from fastsam2.runtime.precision import variant_path

    sessions = {"ort-cpu fp32": OrtSession(bundle.graph_path("image_encoder"), ["CPUExecutionProvider"], threads)}
    variants = bundle.manifest["graphs"]["image_encoder"].get("variants") or {}
    for p, v in variants.items():
        if v.get("format") != "hint":
            sessions[f"ort-cpu {p} ({v.get('format')})"] = OrtSession(variant_path(bundle, "image_encoder", p),
                                                                      ["CPUExecutionProvider"], threads)
    if openvino_available():
        sessions["openvino fp32"] = OpenVINOSession(bundle.graph_path("image_encoder"), "CPU", threads, "fp32")
        for p, v in variants.items():
            if v.get("format") == "qdq":
                sessions[f"openvino {p} (qdq)"] = OpenVINOSession(variant_path(bundle, "image_encoder", p), "CPU", threads, p)
    feed = {"image": image}
    ref = sessions["ort-cpu fp32"].run(feed)
    err = {}
    for k, s in sessions.items():
        out = s.run(feed)
        err[k] = {n: round(float(np.abs(out[n] - r).max() / np.abs(r).max()), 5) for n, r in ref.items()}
    res = interleave({k: (lambda s=s: s.run(feed)) for k, s in sessions.items()}, reps)
    base = res["ort-cpu fp32"]["median_ms"]
    for k in res:
        res[k].update(rel_max_abs_err=err[k], speedup_vs_ort_fp32=round(base / res[k]["median_ms"], 3))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="encoder_ops,attention,session")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from fastsam2.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    S = bundle.manifest["image_size"]
    image = np.random.default_rng(0).standard_normal((1, 3, S, S)).astype(np.float32)
    res = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "image_size": S, "threads": args.threads, "reps": args.reps, "loadavg_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as work:
        for part in args.only.split(","):
            t0 = time.perf_counter()
            if part == "encoder_ops":
                res[part] = encoder_ops(bundle, image, args.threads, Path(work))
            elif part == "attention":
                res[part] = attention(bundle, args.threads, args.reps)
            elif part == "encoder_precision":
                res[part] = encoder_precision(bundle, image, args.threads, args.reps)
            elif part == "session":
                res[part] = session_levers(bundle, image, args.threads, args.reps, Path(work))
            elif part == "chain":
                res[part] = chain(bundle, args.threads, args.reps, Path(work))
            res.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
            print(part, json.dumps(res[part])[:600], flush=True)
    res["loadavg_after"] = list(os.getloadavg())
    out = args.out or ROOT / "bench" / "results" / f"levers_{S}px.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
