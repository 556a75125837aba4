"""Summaries of bench/bench.py results: steady-state FPS, per-stage medians, IoU, the targets
table, and the plots. Pure functions of the results JSON (`bench.py --resummarise` reuses them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from children import write_json

STEADY_FROM = 7  # frames 0..6 fill the memory bank (num_maskmem = 7)
STAGES = ("image_encoder", "router", "memory_attention", "memory_encoder", "mask_decoder")
TARGETS = {
    "fps_keep03_vs_official": 2.0,
    "memory_attention_speedup_keep03": 4.0,
    "rss_keep03_vs_official": 0.6,
    "fps_keep10_vs_official": 1.0,
    "flat_cost_frame300_vs_frame10": 0.05,
}


def load_masks(path: Path) -> np.ndarray:
    with np.load(path) as z:
        shape = tuple(z["shape"])
        return np.unpackbits(z["bits"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def iou_per_frame(a: np.ndarray, b: np.ndarray) -> list:
    from fastsam2.runtime.metrics import mask_iou

    n = min(len(a), len(b))
    return [float(j) for j in np.atleast_1d(mask_iou(a[:n], b[:n]))]


def median(v):
    return float(np.median(v)) if len(v) else None


def stage_medians(frames: list) -> dict:
    steady = frames[STEADY_FROM:] or frames[1:]
    return {s: round(median([f["latency_ms"].get(s, 0.0) for f in steady]), 1)
            for s in STAGES if any(s in f["latency_ms"] for f in steady)}


def steady_fps(frames: list) -> tuple:
    steady = [f["frame_ms"] for f in frames[STEADY_FROM:]] or [f["frame_ms"] for f in frames[1:]]
    med = median(steady)
    return (round(1e3 / med, 4) if med else None), (round(med, 1) if med else None), len(steady)


def iou_summary(v: list) -> dict:
    tracked = v[1:] or v
    return {"mean": round(float(np.mean(tracked)), 4), "min": round(float(np.min(tracked)), 4),
            "per_frame": [round(x, 4) for x in v]}


def end_to_end_fps(name: str, c: dict):
    """Frames / seconds for the whole video: the official predictor's up-front frame loading
    (init_state) and prompt counted in, fastsam2's per-frame decoding and preprocessing too."""
    n = len(c["frames"])
    if name == "official":
        secs = c["init_state_s"] + c["prompt_frame_ms"] / 1e3 + sum(f["frame_ms"] for f in c["frames"]) / 1e3
    else:
        secs = c["totals"]["seconds"]
    return round(n / secs, 4) if secs else None


def summarise(cfgs: dict) -> list:
    off = cfgs["official"]
    off_fps = off["steady_fps"]
    rows = []
    for name, c in cfgs.items():
        rows.append({"config": name, "steady_fps": c["steady_fps"], "steady_frame_ms": c["steady_frame_ms"],
                     "fps_vs_official": round(c["steady_fps"] / off_fps, 3) if off_fps else None,
                     "end_to_end_fps": end_to_end_fps(name, c),
                     "stages_ms": c["stages_ms"], "peak_rss_mb": c["peak_rss_mb"],
                     "iou_vs_keep_1.0": c.get("iou_vs_keep_1.0"), "iou_vs_official": c.get("iou_vs_official"),
                     "bank_stored_tokens": c["bank"]["stored_tokens"],
                     "foreign_cpu_share": c.get("foreign_cpu_share"), "steal_cpu_share": c.get("steal_cpu_share"),
                     "disturbed": c.get("disturbed")})
    for r in rows:
        for key in ("iou_vs_keep_1.0", "iou_vs_official"):
            if r[key]:
                r[key] = {k: v for k, v in r[key].items() if k != "per_frame"}
    return rows


def targets(cfgs: dict, rss: dict | None, flat: dict | None) -> dict:
    """Each target of the issue: its goal, the measured value, met or not. Never tuned."""
    off, k03, k10 = cfgs["official"], cfgs.get("keep_0.3"), cfgs["keep_1"]
    ma = lambda c: c["stages_ms"].get("memory_attention")  # noqa: E731
    measured = {
        "fps_keep03_vs_official": round(k03["steady_fps"] / off["steady_fps"], 3) if k03 else None,
        "memory_attention_speedup_keep03": round(ma(k10) / ma(k03), 3) if k03 else None,
        "rss_keep03_vs_official": rss["ratio"] if rss else None,
        "fps_keep10_vs_official": round(k10["steady_fps"] / off["steady_fps"], 3),
        "flat_cost_frame300_vs_frame10": round(abs(flat["ratio_windows"] - 1), 4) if flat else None,
    }
    at_most = {"rss_keep03_vs_official", "flat_cost_frame300_vs_frame10"}
    out = {}
    for k, goal in TARGETS.items():
        v = measured[k]
        met = None if v is None else (v <= goal if k in at_most else v >= goal)
        out[k] = {"target": goal, "kind": "at most" if k in at_most else "at least", "measured": v, "met": met}
    return out


def resummarise(path: Path) -> None:
    """Recompute the table and targets of a results JSON from its raw per-frame data."""
    result = json.loads(path.read_text())
    result["table"] = summarise(result["configs"])
    result["targets"] = targets(result["configs"], result.get("rss_run"), result.get("flat_cost"))
    write_json(path, result)
    print(json.dumps({"table": result["table"], "targets": result["targets"]}, indent=1))


def plot(result: dict, stages_png: Path, flat_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["table"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [r["config"].replace("keep_", "keep ") for r in rows]
    bottom = np.zeros(len(rows))
    for s in STAGES:
        vals = np.array([r["stages_ms"].get(s, 0.0) for r in rows])
        ax.bar(labels, vals, bottom=bottom, label=s)
        bottom += vals
    for x, r in enumerate(rows):
        ax.annotate(f"{r['steady_frame_ms']:.0f} ms/frame\n{r['steady_fps']:.2f} FPS", (x, bottom[x]),
                    ha="center", va="bottom", fontsize=8)
    st, mc = result["settings"], result["machine"]
    ax.set_ylabel("median per-stage time, steady frames (ms)")
    ax.set_title(f"SAM2VideoPredictor vs fastsam2 ort-cpu, {st['config']} {st['image_size']} px, "
                 f"{mc['threads']} threads", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.18)
    fig.tight_layout()
    fig.savefig(stages_png, dpi=120)
    plt.close(fig)
    flat = result.get("flat_cost")
    if flat:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(flat["frame_ms"], lw=0.8, label="frame")
        ax.plot([v or 0 for v in flat["memory_attention_ms"]], lw=0.8, label="memory_attention")
        ax.axvline(10, color="grey", ls=":")
        ax.axvline(flat["later_frame"], color="grey", ls=":")
        ax.set_xlabel("frame")
        ax.set_ylabel("ms")
        ax.set_title(f"fastsam2 per-frame time over {flat['frames']} frames ({flat['image_size']} px, keep 0.5)",
                     fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(flat_png, dpi=120)
        plt.close(fig)
