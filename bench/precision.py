"""Backends x CPU precisions x keep against the official SAM2VideoPredictor, in lockstep.

    python bench/precision.py                              # 1024 px, 12 frames: the committed run
    python bench/precision.py --image-size 256 --frames 10 # smoke run (a minute or two)

    python bench/precision.py --objects 1,2,4,8 --configs ort-cpu:fp32,*:picked

One process runs every configuration frame by frame: frame i of the official predictor, then
frame i of each (backend, precision, keep, objects) tracker, in an order that rotates every
frame. On a CPU shared with other work, load then hits every configuration alike and the ratios
hold even where absolute times do not (os.getloadavg() is recorded per frame). Peak RSS per
configuration is bench/bench.py's job (one process each); this one measures speed and agreement.

Rows: ort-cpu fp32 / int8, openvino fp32 / int8 (QDQ variants only), bf16 where the CPU has it
(else the JSON says why not), `auto` with the bundle's picks, each at every --keeps and every
--objects count (one official predictor per count, on a video with that many objects; a row is
compared with the official predictor of its own count). With objects > 1, where Session.open
takes batch_objects, each configuration also runs batched (name suffix :batched; else `skipped`
says why). Per row: steady-state ms/frame (frames >= 7, the bank full, median), x official,
per-stage medians, mask IoU vs the official masks and vs fastsam2's ort-cpu fp32 path at the
same keep and objects (batched rows: also vs the same configuration per object). --configs
limits the rows. The int8 variants come from fastsam2.export.precision (its agreement gate is
run here and recorded). The machine's CPU flags (host.cpu_features) are in the JSON.

A benchmark, not a test: it writes numbers and never fails on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from fastsam2.runtime.prompts import parse_keeps

from bundles import add_variants, ensure_bundle
from precision_docs import write_fidelity_section
from precision_runs import (Official, Ours, batch_objects_supported, config_name, configs, parse_objects,
                            parse_prefixes, selected, why_not_batched)

ROOT = Path(__file__).resolve().parents[1]
STEADY_FROM = 7  # frames 0..6 fill the memory bank (num_maskmem = 7)


def prepare_bundle(args, work: Path, log) -> Path:
    """A cpu-target bundle (random weights) with gated variants, made in child processes: an fp32
    export, then this script's --precision through the gate (export's own default would gate
    the target's candidates and keep only the fastest). A --bundle is used as it is (variants
    added if it has none)."""
    gate_args = {"gate_videos": args.gate_videos, "gate_frames": args.gate_frames}
    if args.bundle is not None:
        add_variants(args.bundle, args.precision, gate_args, threads=args.threads, show=True, log=log)
        return args.bundle
    return ensure_bundle(work / f"bundle_{args.image_size}", args.image_size, gate=args.precision,
                         gate_args=gate_args, threads=args.threads, show=True, log=log)


def iou(a, b) -> float:
    """Mean over objects of the IoU of [objects, H, W] masks."""
    from fastsam2.runtime.metrics import mask_iou

    return float(np.mean(mask_iou(a, b)))


def iou_summary(masks: dict, a: str, b: str) -> dict:
    """IoU of a's masks against b's on every tracked frame (frame 0 is the prompt): mean, min."""
    v = [iou(masks[a][j], masks[b][j]) for j in range(1, len(masks[a]))]
    return {"mean": round(float(np.mean(v)), 4), "min": round(float(np.min(v)), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--keeps", default="1.0,0.3")
    ap.add_argument("--objects", default="1", help="objects clicked on frame 0 (official and ours alike): a count, "
                    "or a comma list (1,2,4,8) run in the same lockstep loop, one official predictor per count")
    ap.add_argument("--configs", default=None, help="only these rows: comma list of config-name prefixes, field by "
                    "field, * for any (ort-cpu:fp32, *:picked:keep0.3); the official predictor always runs")
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
    try:
        counts = parse_objects(args.objects)
        keeps = list(parse_keeps(args.keeps))
    except ValueError as e:
        ap.error(str(e))
    prefixes = parse_prefixes(args.configs)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    warnings.filterwarnings("ignore")
    t_all = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_all:7.1f} s] {m}", flush=True)  # noqa: E731
    args.work.mkdir(parents=True, exist_ok=True)
    bdir = prepare_bundle(args, args.work, log)

    from fastsam2.calibration.synthetic import make_video
    from fastsam2.runtime import host
    from fastsam2.runtime.bundle import load_bundle

    size = (240, 320) if args.image_size <= 512 else (480, 640)
    videos = {n: make_video(args.work / f"video_{args.frames}_{n}", num_frames=args.frames, size=size, seed=0,
                            objects=n, fmt="jpg") for n in counts}
    points = {n: {o: [float(v) for v in xy] for o, xy in sorted(v.first_frame_points.items())} for n, v in videos.items()}
    bundle = load_bundle(bdir)
    rows, skipped = configs(bundle, args, prefixes, log)
    runs = make_runs(args, bundle, rows, keeps, counts, points, videos, prefixes, skipped, log)
    (frame_ms, stages, masks), load = lockstep(runs, videos, skipped, log)
    table = make_table(runs, rows, frame_ms, stages, masks)
    m = bundle.manifest
    several = len(counts) > 1
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": host.cpu_model(), "cpu_flags": host.cpu_features(), "cores": os.cpu_count(),
                    "platform": platform.platform(), "bf16": host.cpu_has_bf16(), "vnni": host.cpu_has_vnni(),
                    "threads": args.threads, "versions": _versions()},
        "settings": {"image_size": args.image_size, "frames": args.frames, "video_hw": list(size), "keeps": keeps,
                     "steady_from_frame": STEADY_FROM, "lockstep": True,
                     "objects": counts if several else counts[0],
                     "points": {str(n): p for n, p in points.items()} if several else points[counts[0]],
                     "configs": args.configs, "batch_objects_supported": batch_objects_supported(),
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
        print(f"{r['config']:40s} {r['steady_ms']:8.1f} ms  x{r['x_official']:.2f}  "
              f"IoU off {r.get('iou_vs_official', {}).get('mean', '-')}  "
              f"IoU fp32 {r.get('iou_vs_ort_fp32_same_keep', {}).get('mean', '-')}")
    return 0


def make_runs(args, bundle, rows, keeps, counts, points, videos, prefixes, skipped, log) -> dict:
    """{config name: (row spec, tracker)}: per object count its official predictor, then every
    (backend, precision) x keep, per object and (objects > 1, where fastsam2 has it) batched."""
    several, why_not = len(counts) > 1, why_not_batched(bundle.manifest)
    batch = why_not is None
    if why_not and counts[-1] > 1:
        skipped["batched"] = why_not
    runs = {}
    for n in counts:
        ours = {}
        for (b, p), (s, _, _) in rows.items():
            for k in keeps:
                for batched in (False, True) if (batch and n > 1) else (False,):
                    name = config_name(b, p, k, n, batched, several)
                    if selected(name, prefixes):
                        spec = {"backend": b, "precision": p, "keep": k, "objects": n, "batched": batched}
                        ours[name] = (spec, Ours(bundle, s, k, points[n], args.frames, batched=batched))
        if not ours:
            continue  # --configs left no row at this count: its official predictor would compare with nothing
        log(f"official SAM2VideoPredictor, {n} object(s): init_state")
        spec = {"backend": "official", "precision": "fp32 (PyTorch)", "keep": None, "objects": n, "batched": False}
        runs[f"official:obj{n}" if several else "official"] = (spec, Official(args, videos[n].frames_dir_or_file,
                                                                              points[n]))
        runs.update(ours)
    if not any(spec["backend"] != "official" for spec, _ in runs.values()):
        print(f"error: --configs {args.configs!r} selects no row this machine runs", file=sys.stderr)
        raise SystemExit(2)
    return runs


def lockstep(runs: dict, videos: dict, skipped: dict, log) -> tuple:
    """Frame i of every run, in an order that rotates every frame (no config always first). A
    fastsam2 run that raises leaves the loop (and `runs`) with its error in `skipped`: one
    broken configuration must not cost the others' hour of measuring."""
    from contextlib import ExitStack

    from fastsam2.runtime.video import open_frames

    names = list(runs)
    frame_ms, stages, masks = ({n: [] for n in names} for _ in range(3))
    load = []
    with ExitStack() as stack:
        sources = {c: iter(stack.enter_context(open_frames(v.frames_dir_or_file))) for c, v in videos.items()}
        for frames in zip(*sources.values()):
            rgb = {c: f[1] for c, f in zip(sources, frames)}
            i = frames[0][0]
            for n in names[i % len(names):] + names[:i % len(names)]:
                if n not in runs:
                    continue
                spec, tracker = runs[n]
                t0 = time.perf_counter()
                try:
                    m, st = tracker.step(i, rgb[spec["objects"]])
                except Exception as e:  # noqa: BLE001  (a fastsam2 row's failure is a result)
                    if spec["backend"] == "official":
                        raise
                    skipped[n] = f"failed at frame {i}: {type(e).__name__}: " + " ".join(str(e).split())[:300]
                    log(f"{n}: {skipped[n]}")
                    del runs[n]
                    continue
                frame_ms[n].append(round((time.perf_counter() - t0) * 1e3, 1))
                stages[n].append({k: round(v, 1) for k, v in st.items()})
                masks[n].append(m)
            load.append(round(os.getloadavg()[0], 2))
            log(f"frame {i}: " + ", ".join(f"{n} {frame_ms[n][-1]:.0f}" for n in names if n in runs)
                + f" ms; load {load[-1]}")
    keep = set(runs)
    return tuple({n: v for n, v in d.items() if n in keep} for d in (frame_ms, stages, masks)), load


def make_table(runs, rows, frame_ms, stages, masks) -> list:
    """A row per run: steady ms/frame, x the official predictor with the same objects, stage
    medians, IoU vs that predictor and vs ort-cpu fp32 at the same keep and objects (batched
    rows: also vs the same configuration per object)."""
    def steady(v):
        return float(np.median(v[STEADY_FROM:] or v[1:]))

    official = {spec["objects"]: n for n, (spec, _) in runs.items() if spec["backend"] == "official"}
    several = len(official) > 1
    table = []
    for n, (spec, _) in runs.items():
        b, p, k, objects = spec["backend"], spec["precision"], spec["keep"], spec["objects"]
        off = official[objects]
        row = {"config": n, "backend": b, "precision": p, "keep": None if k is None else f"{k:g}",
               "objects": objects, "batched": spec["batched"],
               "steady_ms": round(steady(frame_ms[n]), 1),
               "x_official": round(steady(frame_ms[off]) / steady(frame_ms[n]), 3),
               "stages_ms": {s: round(float(np.median([f.get(s, 0.0) for f in stages[n][STEADY_FROM:] or stages[n][1:]])), 1)
                             for s in sorted({s for f in stages[n] for s in f})},
               "graph_precision": rows[(b, p)][1] if b != "official" else None}
        if b != "official":
            row["iou_vs_official"] = iou_summary(masks, n, off)
            ref = config_name("ort-cpu", "fp32", k, objects, False, several)
            if ref in masks:
                row["iou_vs_ort_fp32_same_keep"] = iou_summary(masks, n, ref)
            if spec["batched"] and config_name(b, p, k, objects, False, several) in masks:
                row["iou_vs_per_object"] = iou_summary(masks, n, config_name(b, p, k, objects, False, several))
        table.append(row)
    return table


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
