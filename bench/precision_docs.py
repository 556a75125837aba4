"""docs/fidelity.md's precision x keep section, written from one bench/precision.py results JSON."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


SECTION = "## Precision x keep"


def fidelity_section(result: dict, source: str) -> str:
    """docs/fidelity.md's precision x keep table, from one bench/precision.py results JSON."""
    st, gate = result["settings"], result.get("precision_gate") or {}
    counts = st["objects"] if isinstance(st.get("objects"), list) else [st.get("objects", 1)]
    # a column says how many objects (and whether batched) per row where rows differ in that
    several = len(counts) > 1 or any(r.get("batched") for r in result["table"])
    clicks = "one click" if counts == [1] else f"one click on each of {'/'.join(map(str, counts))} objects"
    lines = [SECTION, "",
             f"From `{result['command']}` ({source}, {result['created']}; {st['frames']} frames at "
             f"{st['image_size']} px, {clicks}, random weights, machine load {min(result['loadavg_1min_per_frame'])}"
             f"-{max(result['loadavg_1min_per_frame'])}). IoU per tracked frame, mean / min: against the official "
             "predictor's masks, and against fastsam2's own ort-cpu fp32 path at the same keep (what the "
             "reduced precision alone changes).", "",
             "| backend | precision (graphs not fp32) | keep |" + (" objects |" if several else "")
             + " IoU vs fp32 path | IoU vs official | × official speed |",
             "|---|---|---|" + ("---|" if several else "") + "---|---|---|"]
    for r in result["table"]:
        if r["backend"] == "official":
            continue
        red = ", ".join(f"{g} {p}" for g, p in (r["graph_precision"] or {}).items() if p != "fp32") or "all fp32"
        f = lambda d: f"{d['mean']:.3f} / {d['min']:.3f}" if d else "–"  # noqa: E731
        obj = f" {r['objects']}{' batched' if r.get('batched') else ''} |" if several else ""
        lines.append(f"| {r['backend']} | {red} | {float(r['keep']):.1f} |{obj} {f(r.get('iou_vs_ort_fp32_same_keep'))} | "
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
