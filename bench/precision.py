"""Backends x CPU precisions x keep against the official SAM2VideoPredictor, in lockstep.

    python bench/precision.py                              # 1024 px, 12 frames: the committed run
    python bench/precision.py --image-size 256 --frames 10 # smoke run (a minute or two)

One process runs every configuration frame by frame: frame i of the official predictor, then
frame i of each (backend, precision, keep) tracker, in an order that rotates every frame. On a
CPU shared with other work, load then hits every configuration alike and the ratios hold even
where absolute times do not (os.getloadavg() is recorded per frame). Peak RSS per configuration
is bench/bench.py's job (one process each); this one measures speed and agreement only.

Rows: ort-cpu fp32 / int8, openvino fp32 / int8 (QDQ variants only), bf16 where the CPU has it
(else the JSON says why not), each at every --keeps. Per row: steady-state ms/frame (frames >= 7,
the bank full, median), x official, per-stage medians, mask IoU vs the official masks and vs
fastsam2's ort-cpu fp32 path at the same keep. The int8 variants come from
fastsam2.export.precision (its agreement gate is run here and recorded).

A benchmark, not a test: it writes numbers and never fails on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEADY_FROM = 7  # frames 0..6 fill the memory bank (num_maskmem = 7)
OFFICIAL_HOOKS = {"forward_image": "image_encoder", "_prepare_memory_conditioned_features": "memory_attention",
                  "_forward_sam_heads": "mask_decoder", "_encode_new_memory": "memory_encoder"}


def sh(cmd: list, log) -> None:
    log(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def prepare_bundle(args, work: Path, log) -> Path:
    """A cpu-target bundle (random weights) with gated int8 variants, made in child processes."""
    b = args.bundle or work / f"bundle_{args.image_size}"
    if args.bundle is None and not (b / "manifest.json").is_file():
        # fp32 export, then this script's --precision through the gate (export's own default
        # would gate the target's candidates and keep only the fastest)
        sh([sys.executable, "-m", "fastsam2.export.cli", "--target", "cpu", "--keep", "1.0", "--prompts", "object",
            "--text-pretrained", "random", "--image-size", args.image_size, "--out", b, "--force",
            "--precision", "fp32"], log)
    m = json.loads((b / "manifest.json").read_text())
    if not (m.get("precision_gate") or {}).get("graphs"):  # no variants gated yet
        sh([sys.executable, "-m", "fastsam2.export.precision", b, "--precision", args.precision,
            "--threads", args.threads, "--gate-videos", args.gate_videos, "--gate-frames", args.gate_frames], log)
    return b


class Official:
    """SAM2VideoPredictor stepped one frame at a time (propagate_in_video is a generator)."""

    def __init__(self, args, frames_dir, points: dict):
        import torch

        from fastsam2.export.sam2_loader import load_sam2

        torch.set_num_threads(args.threads)
        self.pred = load_sam2("sam2.1_hiera_t", None, image_size=args.image_size, seed=0, warn=False).model
        self.stage = {}
        for meth, name in OFFICIAL_HOOKS.items():
            setattr(self.pred, meth, self._hook(getattr(self.pred, meth), name))
        self.state = self.pred.init_state(str(frames_dir))
        for o, xy in points.items():
            self.pred.add_new_points_or_box(self.state, frame_idx=0, obj_id=o, points=np.array([xy], np.float32),
                                            labels=np.array([1], np.int32))
        self._ctx = torch.inference_mode()
        self._ctx.__enter__()
        self.gen = self.pred.propagate_in_video(self.state)

    def _hook(self, method, name):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                self.stage[name] = self.stage.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        return timed

    def step(self):
        self.stage = {}
        _, _, m = next(self.gen)
        return (m[:, 0] > 0).numpy().copy(), dict(self.stage)


class Ours:
    """One fastsam2 streaming session: a backend's graph sessions at one precision and keep,
    every object clicked on frame 0."""

    def __init__(self, bundle, sessions, keep, points: dict, num_frames):
        from fastsam2.runtime.session import Session

        self.s = Session.open(bundle, keep=keep, graphs=("bench", sessions), num_frames=num_frames)
        for o, xy in points.items():
            self.s.add_prompt(o, points=[tuple(xy)])

    def step(self, i, rgb):
        r = self.s.push(rgb)
        return np.stack([r.objects[o].mask for o in sorted(r.objects)]), dict(r.latency_ms)


def iou(a, b) -> float:
    """Mean over objects of the IoU of [objects, H, W] masks."""
    from fastsam2.runtime.metrics import mask_iou

    return float(np.mean(mask_iou(a, b)))


def configs(bundle, args, log) -> dict:
    """{(backend, precision): sessions} for every row this machine can run, + why others are not."""
    from fastsam2.runtime.backends import available_backends, create_sessions, open_backend
    from fastsam2.runtime.errors import FastSam2Error
    from fastsam2.runtime.openvino_backend import device_has_bf16

    have, out, skipped = available_backends(), {}, {}
    variants = {g: set(v.get("variants") or {}) for g, v in bundle.manifest["graphs"].items()}
    for backend in args.backends.split(","):
        if backend not in have:
            skipped[backend] = "not installed"
            continue
        for p in ("fp32", "int8", "bf16"):
            if p != "fp32" and not any(p in v for v in variants.values()):
                if p == "bf16":
                    skipped[f"{backend}:bf16"] = ("this CPU has no bf16 (OpenVINO reports no BF16)"
                                                  if not device_has_bf16("CPU") else "no bf16 variant in the bundle")
                continue
            said = []
            try:
                s = create_sessions(bundle, backend, args.threads, precision=p, warn=said.append)
            except FastSam2Error as e:  # e.g. bf16 variants that only OpenVINO runs
                skipped[f"{backend}:{p}"] = str(e)
                continue
            got = {g: x.precision for g, x in s.items()}
            if p != "fp32" and all(v == "fp32" for v in got.values()):
                skipped[f"{backend}:{p}"] = "; ".join(said) or "no graph runs in it"
                continue
            out[(backend, p)] = (s, got, said)
            log(f"{backend} {p}: {got}" + (f" ({'; '.join(said)})" if said else ""))
    # what a user of the defaults gets: `auto` with the bundle's picks (graphs on the backend
    # that runs their precision, e.g. a bf16 encoder on OpenVINO and the rest on ONNX Runtime)
    said = []
    name, s = open_backend("auto", bundle, args.threads, warn=said.append)
    out[(name, "picked")] = (s, {g: x.precision for g, x in s.items()}, said)
    log(f"auto -> {name} with the bundle's picks: {out[(name, 'picked')][1]}")
    return out, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--keeps", default="1.0,0.3")
    ap.add_argument("--objects", type=int, default=1, help="objects clicked on frame 0 (official and ours alike)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="ort-cpu,openvino")
    ap.add_argument("--precision", default="int8", help="what export.precision adds to the bundle (default int8)")
    ap.add_argument("--gate-videos", type=int, default=1)
    ap.add_argument("--gate-frames", type=int, default=8)
    ap.add_argument("--bundle", type=Path, default=None, help="reuse a bundle (variants added if missing)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "precision")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/precision_<S>px.json)")
    ap.add_argument("--no-docs", action="store_true", help="leave docs/fidelity.md's precision section as it is")
    args = ap.parse_args(argv)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    warnings.filterwarnings("ignore")
    t_all = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_all:7.1f} s] {m}", flush=True)  # noqa: E731
    args.work.mkdir(parents=True, exist_ok=True)
    bdir = prepare_bundle(args, args.work, log)

    from fastsam2.calibration.synthetic import make_video
    from fastsam2.runtime import host
    from fastsam2.runtime.bundle import load_bundle
    from fastsam2.runtime.video import open_frames

    size = (240, 320) if args.image_size <= 512 else (480, 640)
    video = make_video(args.work / f"video_{args.frames}_{args.objects}", num_frames=args.frames, size=size, seed=0,
                       objects=args.objects, fmt="jpg")
    points = {o: [float(v) for v in xy] for o, xy in sorted(video.first_frame_points.items())}
    bundle = load_bundle(bdir)
    rows, skipped = configs(bundle, args, log)
    keeps = [float(k) for k in args.keeps.split(",")]
    ours = {f"{b}:{p}:keep{k:g}": Ours(bundle, s, k, points, args.frames)
            for (b, p), (s, _, _) in rows.items() for k in keeps}
    log("official SAM2VideoPredictor: init_state")
    official = Official(args, video.frames_dir_or_file, points)
    names = ["official", *ours]
    frame_ms = {n: [] for n in names}
    stages = {n: [] for n in names}
    masks = {n: [] for n in names}
    load = []
    with open_frames(video.frames_dir_or_file) as src:
        for i, rgb in src:
            order = names[i % len(names):] + names[:i % len(names)]  # rotate: no config always first
            for n in order:
                t0 = time.perf_counter()
                m, st = official.step() if n == "official" else ours[n].step(i, rgb)
                frame_ms[n].append(round((time.perf_counter() - t0) * 1e3, 1))
                stages[n].append({k: round(v, 1) for k, v in st.items()})
                masks[n].append(m)
            load.append(round(os.getloadavg()[0], 2))
            log(f"frame {i}: " + ", ".join(f"{n} {frame_ms[n][-1]:.0f}" for n in names) + f" ms; load {load[-1]}")

    def steady(v):
        return float(np.median(v[STEADY_FROM:] or v[1:]))

    off_ms = steady(frame_ms["official"])
    table = []
    for n in names:
        b, p, k = (n.split(":") + ["", ""])[:3] if n != "official" else ("official", "fp32 (PyTorch)", "")
        ref_ours = f"ort-cpu:fp32:{k}"
        tracked = range(1, len(masks[n]))
        row = {"config": n, "backend": b, "precision": p, "keep": k.replace("keep", "") or None,
               "steady_ms": round(steady(frame_ms[n]), 1), "x_official": round(off_ms / steady(frame_ms[n]), 3),
               "stages_ms": {s: round(float(np.median([f.get(s, 0.0) for f in stages[n][STEADY_FROM:] or stages[n][1:]])), 1)
                             for s in sorted({s for f in stages[n] for s in f})},
               "graph_precision": rows[(b, p)][1] if n != "official" else None}
        if n != "official":
            row["iou_vs_official"] = {"mean": round(float(np.mean([iou(masks[n][j], masks["official"][j]) for j in tracked])), 4),
                                      "min": round(float(np.min([iou(masks[n][j], masks["official"][j]) for j in tracked])), 4)}
            if ref_ours in masks:
                v = [iou(masks[n][j], masks[ref_ours][j]) for j in tracked]
                row["iou_vs_ort_fp32_same_keep"] = {"mean": round(float(np.mean(v)), 4), "min": round(float(np.min(v)), 4)}
        table.append(row)
    m = bundle.manifest
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": host.cpu_model(), "cpu_flags": host.cpu_features(), "cores": os.cpu_count(),
                    "platform": platform.platform(), "bf16": host.cpu_has_bf16(),
                    "threads": args.threads, "versions": _versions()},
        "settings": {"image_size": args.image_size, "frames": args.frames, "video_hw": list(size), "keeps": keeps,
                     "steady_from_frame": STEADY_FROM, "lockstep": True, "objects": args.objects, "points": points,
                     "weights": "seeded random init (no checkpoint): IoU is agreement, not accuracy"},
        "loadavg_1min_per_frame": load,
        "bundle_precision": m.get("precision"), "precision_gate": m.get("precision_gate"),
        "variants": {g: {p: {k: v.get(k) for k in ("file", "bytes", "format", "weights")} for p, v in (e.get("variants") or {}).items()}
                     for g, e in m["graphs"].items() if e.get("variants")},
        "skipped": skipped, "warnings": {f"{b}:{p}": w for (b, p), (_, _, w) in rows.items() if w},
        "table": table, "frame_ms": frame_ms, "wall_s": round(time.perf_counter() - t_all, 1),
    }
    out = args.out or ROOT / "bench" / "results" / f"precision_{args.image_size}px.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False))
    log(f"wrote {out}")
    if not args.no_docs:
        write_fidelity_section(result, out, ROOT / "docs" / "fidelity.md")
    for r in table:
        print(f"{r['config']:28s} {r['steady_ms']:8.1f} ms  x{r['x_official']:.2f}  "
              f"IoU off {r.get('iou_vs_official', {}).get('mean', '-')}  "
              f"IoU fp32 {r.get('iou_vs_ort_fp32_same_keep', {}).get('mean', '-')}")
    return 0


SECTION = "## Precision x keep"


def fidelity_section(result: dict, source: str) -> str:
    """docs/fidelity.md's precision x keep table, from one bench/precision.py results JSON."""
    st, gate = result["settings"], result.get("precision_gate") or {}
    lines = [SECTION, "",
             f"From `{result['command']}` ({source}, {result['created']}; {st['frames']} frames at "
             f"{st['image_size']} px, one click, random weights, machine load {min(result['loadavg_1min_per_frame'])}"
             f"-{max(result['loadavg_1min_per_frame'])}). IoU per tracked frame, mean / min: against the official "
             "predictor's masks, and against fastsam2's own ort-cpu fp32 path at the same keep (what the "
             "reduced precision alone changes).", "",
             "| backend | precision (graphs not fp32) | keep | IoU vs fp32 path | IoU vs official | × official speed |",
             "|---|---|---|---|---|---|"]
    for r in result["table"]:
        if r["config"] == "official":
            continue
        red = ", ".join(f"{g} {p}" for g, p in (r["graph_precision"] or {}).items() if p != "fp32") or "all fp32"
        f = lambda d: f"{d['mean']:.3f} / {d['min']:.3f}" if d else "–"  # noqa: E731
        lines.append(f"| {r['backend']} | {red} | {float(r['keep']):.1f} | {f(r.get('iou_vs_ort_fp32_same_keep'))} | "
                     f"{f(r.get('iou_vs_official'))} | {r['x_official']:.2f}× |")
    cores = result["machine"].get("cores") or 1
    if max(result["loadavg_1min_per_frame"]) > cores:
        lines += ["", f"The speed column is not evidence here: the load average ({max(result['loadavg_1min_per_frame'])}) "
                      f"exceeded the {cores} cores, and PyTorch suffers more than ONNX Runtime from oversubscribed "
                      "cores (docs/benchmarks.md). The IoU columns do not depend on load."]
    if result.get("skipped"):
        lines += ["", "Not run here: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()) + "."]
    g = gate.get("graphs") or {}
    if g:
        lines += ["", f"Export's agreement gate on this bundle ({gate.get('gate_set')}; calibration: "
                      f"{gate.get('calibration')}; pass: tracked-mask IoU vs fp32 ≥ {gate.get('min_mask_iou')}):", "",
                  "| graph | candidate | worst output error (of range) | tracked-mask IoU vs fp32 | ms / call (fp32) | verdict |",
                  "|---|---|---|---|---|---|"]
        for graph, info in g.items():
            base = info["tried"]["fp32"]["ms_per_call"]
            for name, r in info["tried"].items():
                if name == "fp32":
                    continue
                if "skipped" in r:
                    lines.append(f"| {graph} | {name} | – | – | – | skipped: {r['skipped']} |")
                    continue
                worst = max(r["outputs"]["rel_max_abs_err"].items(), key=lambda kv: kv[1])
                iou = r["masks"]["mean_iou"] if r.get("masks") else "non-finite"
                lines.append(f"| {graph} | {name} | {worst[1]:.3f} ({worst[0]}) | {iou} | "
                             f"{r['outputs']['ms_per_call']:.0f} ({base:.0f}) | {'passes' if r['passed'] else 'fails'} |")
    return "\n".join(lines) + "\n"


def write_fidelity_section(result: dict, source: Path, md: Path) -> None:
    """Replace (or append) the precision section of docs/fidelity.md; the rest is fidelity.py's."""
    text = md.read_text() if md.is_file() else "# Fidelity\n"
    head = text.split(SECTION)[0].rstrip() + "\n\n"
    rel = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    md.write_text(head + fidelity_section(result, str(rel)))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in ("torch", "onnxruntime", "openvino", "sam2", "numpy"):
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
