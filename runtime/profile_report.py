"""fastsam2-profile's report files: report.json, report.md (tables) and latency.png, written
from the dict `fastsam2.runtime.profiling.profile_bundle` returns."""

from __future__ import annotations

import os

import numpy as np

from fastsam2.runtime.contract import GRAPH_ORDER


def _fmt(v, nd=1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def graph_shares(result: dict) -> dict:
    """{graph: whole percent} of the in-frame graphs' summed medians, rounded so that they add
    up to exactly 100 (largest remainders round up). The frame median is not that sum (it is
    the median of per-frame sums), so shares of it do not add up (108 % was seen)."""
    med = {g: v["median_ms"] for g, v in result["graphs"].items() if v["in_frame"]}
    total = sum(med.values())
    if total <= 0:
        return {}
    exact = {g: 100 * v / total for g, v in med.items()}
    out = {g: int(v) for g, v in exact.items()}
    for g in sorted(exact, key=lambda g: out[g] - exact[g])[: 100 - sum(out.values())]:
        out[g] += 1
    return out


def _counts(report: dict) -> str:
    seen = sorted({(r.get("warmup", report["settings"]["warmup"]), r.get("iters", report["settings"]["iters"]))
                   for r in report["results"]}, key=str)
    return "; ".join(f"{w} warm-up + {i} timed frames" for w, i in seen) or "no keep finished"


def report_markdown(report: dict) -> str:
    mc, st, geo = report["machine"], report["settings"], report["geometry"]
    b = report["bundle"]
    lines = [
        "# fastsam2-profile",
        "",
        f"- bundle: `{b['path']}` ({b.get('config')}, {geo['image_size']} px, {geo['tokens']} tokens, "
        f"weights {'random' if b.get('weights_random') else 'checkpoint'})",
        f"- machine: {mc.get('cpu_model')}, {mc.get('cpu_cores')} cores; onnxruntime "
        f"{mc.get('onnxruntime')}"
        + (f"; GPU {mc.get('gpu_name')}, driver {mc.get('gpu_driver')}, TensorRT {mc.get('tensorrt')}"
           if "gpu_name" in mc else ""),
        f"- memory frames {st['memory_frames']} (conditioning frame + {st['memory_frames'] - 1} tracked), "
        f"{st['object_pointers']} object pointers; {_counts(report)} per keep; "
        f"threads {st['threads'] or 'default'}",
        f"- created {report['created']}",
    ]
    if report.get("status", "complete") != "complete":
        done = len(report["results"])
        lines.append(f"- status: {report['status']} after {done} of "
                     f"{len(st['keeps']) * max(1, len(st['backends']))} keeps: the keeps below finished")
    lines += [
        "",
        "## Summary",
        "",
        "| backend | keep | k | M | frame median ms | p90 ms | FPS | speed-up vs first keep | peak RSS MB | device MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = {}
    for r in report["results"]:
        f = r["frame"]
        base = first.setdefault(r["backend"], f["median_ms"])
        lines.append(f"| {r['backend']} | {r['keep']:g} | {r['k']} | {r['shapes']['M']} | {_fmt(f['median_ms'])} "
                     f"| {_fmt(f['p90_ms'])} | {_fmt(f['fps'], 2)} | {_fmt(base / f['median_ms'], 2)}× "
                     f"| {_fmt(r['memory']['peak_rss_mb'])} | {_fmt(r['memory']['device_mb'])} |")
    for r in report["results"]:
        sh = r["shapes"]
        lines += ["", f"## {r['backend']} · keep {r['keep']:g} (N = {sh['N']}, Ms = {sh['Ms']}, M = {sh['M']})",
                  "", "| graph | in frame | median ms | p90 ms | min ms | share of graphs' sum |",
                  "|---|---|---|---|---|---|"]
        shares = graph_shares(r)
        for g, v in r["graphs"].items():
            share = f"{shares[g]} %" if g in shares else "–"
            lines.append(f"| {g} | {'yes' if v['in_frame'] else 'no (k = T)'} | {_fmt(v['median_ms'], 2)} "
                         f"| {_fmt(v['p90_ms'], 2)} | {_fmt(v['min_ms'], 2)} | {share} |")
        f = r["frame"]
        summed = sum(v["median_ms"] for g, v in r["graphs"].items() if g in shares)
        lines.append(f"| graphs' sum | | {_fmt(summed, 2)} | | | 100 % |")
        lines.append(f"| **frame** | | {_fmt(f['median_ms'], 2)} | {_fmt(f['p90_ms'], 2)} | "
                     f"{_fmt(f['min_ms'], 2)} | {_fmt(f['fps'], 2)} FPS |")
        if r["memory"]["device_note"]:
            lines.append(f"\nDevice memory: {r['memory']['device_note']}.")
    lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def plot_latency(report: dict, path) -> list:
    """Stacked bar of per-graph median latency (graphs in the frame) per backend and keep, each
    labelled with its own height (the sum of those medians: the bar and its label are one
    statistic). Returns [(bar height ms, label)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    multi = len({r["backend"] for r in res}) > 1
    labels = [(f"{r['backend']}\n" if multi else "") + f"keep {r['keep']:g}\nk={r['k']}" for r in res]
    fig, ax = plt.subplots(figsize=(1.6 * len(res) + 3, 4.5))
    bottom = np.zeros(len(res))
    for g in GRAPH_ORDER:
        vals = np.array([r["graphs"][g]["median_ms"] if r["graphs"][g]["in_frame"] else 0.0 for r in res])
        ax.bar(labels, vals, bottom=bottom, label=g)
        bottom += vals
    tops = []
    for x, top in enumerate(bottom):
        tops.append((float(top), f"{top:.0f} ms"))
        ax.annotate(tops[-1][1], (x, top), ha="center", va="bottom", fontsize=8)
    geo, mc = report["geometry"], report["machine"]
    where = mc.get("gpu_name") or mc.get("cpu_model")
    ax.set_ylabel("sum of per-graph median latencies (ms)")
    ax.set_title(f"fastsam2 per-graph latency, {geo['image_size']} px ({where})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.margins(y=0.12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return tops


def write_report(report: dict, out_dir, log=None, plot: bool = True) -> list:
    """report.json, report.md and (with plot) latency.png in out_dir; returns the paths written.

    Without matplotlib (it is not a runtime dependency) the plot is skipped, with a log line.
    """
    from fastsam2.runtime.outputs import atomic_write_bytes, atomic_write_json, ensure_writable_dir

    out = ensure_writable_dir(out_dir)
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", report_markdown(report).encode())
    written = [out / "report.json", out / "report.md"]
    if not plot:
        return written
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if log:
            log("latency.png skipped: matplotlib is not installed (pip install matplotlib)")
        return written
    tmp = out / ".latency.png.tmp.png"
    plot_latency(report, tmp)
    os.replace(tmp, out / "latency.png")
    return written + [out / "latency.png"]
