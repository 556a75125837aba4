"""Reduced-precision variants of a bundle's graphs (int8, bf16) and the agreement gate that
decides, per graph, whether a variant may replace fp32 on CPU backends.

Export calls `add_precision_variants(tmp_dir, manifest, plan, ...)` on the temporary bundle
folder before manifest.json is written; `upgrade_bundle(...)` does the same to an existing
bundle (then reseals it). What it writes:

    <graph>_int8.onnx                                 a quantised copy (QDQ or dynamic int8)
    manifest["graphs"][g]["variants"][precision]      file, sha256, bytes, format + gate numbers
    manifest["precision"]                             {graph: precision picked for the target}
    manifest["precision_gate"]                        what was tried, measured, kept or dropped
    manifest["openvino"]                              the target's OpenVINO device and precision

The gate, per candidate (one graph in reduced precision, the others fp32), all on ONNX Runtime
CPU (bf16 on OpenVINO, where the CPU has it):
1. outputs vs fp32 on the feeds each graph received while tracking calibration frames
   (recorded, not random: memory attention sees a real bank): max |diff| / max |fp32| per output;
2. masks tracked at keep 1.0 on generated videos vs the fp32 masks: mean IoU >= MIN_MASK_IOU.
A candidate that fails falls back to fp32 with a warning. Among those that pass, the target's
default is the fastest on this machine (median ms per call on the recorded feeds), fp32 included;
an explicit --precision takes the asked one whenever it passes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from fastsam2.runtime.cli_edge import cli_errors, command_class
from fastsam2.runtime.console import messages
from fastsam2.runtime.contract import GRAPH_ORDER
from fastsam2.runtime.errors import InputError
from fastsam2.runtime import host
from fastsam2.runtime.precision import CPU_PRECISIONS

from .precision_variants import _ort, _ov, drop_unpicked_compiles, lockstep_ms, mask_agreement, output_agreement, quantize_int8, track_masks

# named, not __name__: run as `python -m fastsam2.export.precision` this file is __main__
log = logging.getLogger("fastsam2.export.precision")

MIN_MASK_IOU = 0.97  # the gate: tracked masks at keep 1.0 vs fp32, mean over frames
QUANTISABLE = ("image_encoder", "memory_attention")  # where a CPU frame's time goes


# -- the plan ---------------------------------------------------------------------------------

def precision_plan(profile, requested: str | None = "auto") -> dict:
    """{"graphs": {graph: [candidate precisions, fp32 last]}, "explicit": bool, "openvino": {...}}.

    `auto`/None: the target's cpu_precisions (fastest passing one wins); "fp32": none;
    "int8"/"bf16": that precision for every graph the target lists it for (or QUANTISABLE);
    "image_encoder=int8,memory_attention=fp32": exactly that."""
    from fastsam2.runtime.precision import parse_precision

    listed = dict(getattr(profile, "cpu_precisions", {}) or {})
    requested = (requested or "auto").strip()
    ov = {"device": getattr(profile, "openvino_device", "") or "CPU",
          "precision": getattr(profile, "openvino_precision", "fp32"),
          "preferred": bool(getattr(profile, "openvino_device", ""))}
    if requested == "auto":
        graphs = {g: [p for p in c if p != "fp32"] + ["fp32"] for g, c in listed.items()}
        return {"graphs": {g: c for g, c in graphs.items() if len(c) > 1}, "explicit": False, "openvino": ov}
    asked = parse_precision(requested)
    if "*" in asked:
        graphs = ({g: asked["*"] for g, c in listed.items() if asked["*"] in c} if listed
                  else {g: asked["*"] for g in QUANTISABLE})
    else:
        graphs = asked
    return {"graphs": {g: [p, "fp32"] for g, p in graphs.items() if p != "fp32"}, "explicit": True,
            "openvino": ov}


# -- the gate ---------------------------------------------------------------------------------

def _bundle_view(root: Path, manifest: dict):
    """A Bundle over a folder whose manifest.json is not written yet (export's temporary one)."""
    from fastsam2.runtime.bundle import Bundle, read_text_embeddings

    with np.load(root / manifest["constants"]["file"], allow_pickle=False) as z:
        constants = {k: np.asarray(z[k]) for k in z.files}
    return Bundle(root, manifest, constants, read_text_embeddings(root / manifest["text"]["file"]))


def calibration_feeds(bundle, source, work: Path, frames: int, threads) -> tuple:
    """({graph: [feeds]}, description): what each graph receives while tracking calibration
    frames at keep 1.0. `source`: None (a generated video), a video or frames folder, or a
    folder of `fastsam2-calibrate int8` files (calib_<graph>.npz)."""
    from fastsam2.runtime.synthetic import make_video
    from fastsam2.runtime.video import open_frames

    from .feeds import load_feeds, record_feeds

    if source is not None and Path(source).is_dir() and (Path(source) / "calib_image_encoder.npz").is_file():
        store = {g: load_feeds(Path(source) / f"calib_{g}.npz") for g in GRAPH_ORDER
                 if (Path(source) / f"calib_{g}.npz").is_file()}
        return store, f"fastsam2-calibrate int8 data in {source}"
    if source is None:
        v = make_video(work / "calibration", num_frames=frames, size=(240, 320), seed=7, objects=1, distractors=1)
        src, point, what = v.frames_dir_or_file, tuple(v.first_frame_points[1]), f"a generated video ({frames} frames)"
    else:
        src, point, what = source, None, str(source)
    with open_frames(src) as frames_in:
        point = point or (frames_in.width / 2, frames_in.height / 2)
        store = record_feeds(bundle, frames_in, frames, point=point, keep=1.0, threads=threads,
                             num_frames=frames_in.num_frames, level=logging.DEBUG)
    return store, what


def _gate_one(bundle, g, precision, method, base, ref_masks, videos, feeds, threads, dst_dir) -> dict:
    """Build and measure one candidate: graph g in `precision` (int8 by `method`), others fp32."""
    from fastsam2.runtime.bundle import sha256_file

    src = bundle.graph_path(g)
    if precision == "bf16":
        session, how = _ov(src, threads, "bf16"), {"format": "hint", "backends": ["openvino"]}
        entry = {"file": bundle.manifest["graphs"][g]["file"], "sha256": bundle.manifest["graphs"][g]["sha256"]}
    else:
        dst = dst_dir / f"{g}_int8_{method}.onnx"
        how = quantize_int8(src, dst, method, feeds.get(g) if method == "static" else None)
        session = _ort(dst, threads)
        entry = {"file": dst.name, "sha256": sha256_file(dst), "bytes": dst.stat().st_size}
    outputs = output_agreement(base[g], session, feeds.get(g, []))
    masks = mask_agreement(ref_masks, track_masks(bundle, {**base, g: session}, videos)) if outputs["finite"] else None
    passed = bool(masks and masks["mean_iou"] >= MIN_MASK_IOU)
    return {**entry, **how, "outputs": outputs, "masks": masks, "passed": passed, "session": session}


def add_precision_variants(tmp_dir, manifest: dict, plan: dict, calibration_frames=None, *,
                           threads: int | None = None, calib_frames: int = 8, gate_videos: int = 2,
                           gate_frames: int = 8) -> dict:
    """Write the plan's variants into the bundle folder `tmp_dir`, gate them, and record the
    result in `manifest` (variants, precision, precision_gate, openvino). Returns
    manifest["precision"]. See the module docstring."""
    from fastsam2.runtime.synthetic import make_video
    from fastsam2.runtime.backends import create_sessions

    root = Path(tmp_dir)
    picks = {g: "fp32" for g in GRAPH_ORDER}
    manifest["openvino"] = dict(plan.get("openvino") or {"device": "CPU", "precision": "fp32", "preferred": False})
    gate = {"min_mask_iou": MIN_MASK_IOU, "explicit": plan.get("explicit", False), "graphs": {}}
    manifest["precision"], manifest["precision_gate"] = picks, gate
    todo = {g: c for g, c in plan.get("graphs", {}).items() if any(p != "fp32" for p in c)}
    bad = [p for c in todo.values() for p in c if p not in CPU_PRECISIONS] + [g for g in todo if g not in GRAPH_ORDER]
    if bad:
        raise InputError(f"precision plan names {bad[0]!r}: precisions are {', '.join(CPU_PRECISIONS)}, "
                         f"graphs {', '.join(GRAPH_ORDER)}")
    if not todo:
        return picks
    bundle = _bundle_view(root, manifest)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastsam2-precision-") as work:
        work = Path(work)
        feeds, source = calibration_feeds(bundle, calibration_frames, work, calib_frames, threads)
        gate.update(calibration=source, gate_set=f"{gate_videos} generated videos x {gate_frames} frames, keep 1.0")
        videos = [make_video(work / f"gate{i}", num_frames=gate_frames, size=(240, 320), seed=1000 + i)
                  for i in range(gate_videos)]
        base = create_sessions(bundle, "ort-cpu", threads, precision="fp32", warn=log.warning)
        ref_masks = track_masks(bundle, base, videos)
        kept = {}
        for g, cands in todo.items():
            tried = {"fp32": {"ms_per_call": lockstep_ms({"fp32": base[g]}, feeds.get(g, []))["fp32"]}}
            for p in dict.fromkeys(c for c in cands if c != "fp32"):
                why = _bf16_unavailable() if p == "bf16" else None
                if why:
                    tried[p] = {"skipped": why}
                    log.info(f"{g}: bf16 skipped: {tried[p]['skipped']}")
                    continue
                methods = ("static", "dynamic") if p == "int8" and g == "image_encoder" else ("dynamic",)
                for m in (methods if p == "int8" else ("hint",)):
                    r = _gate_one(bundle, g, p, m, base, ref_masks, videos, feeds, threads, root)
                    name = f"{p}/{m}" if p == "int8" else p
                    tried[name] = {k: v for k, v in r.items() if k not in ("session", "file", "sha256")}
                    _report(g, name, r)
                    best = kept.get((g, p))
                    if r["passed"] and (best is None or r["outputs"]["ms_per_call"] < best["outputs"]["ms_per_call"]):
                        if best is not None and best["format"] != "hint":
                            (root / best["file"]).unlink(missing_ok=True)
                        kept[(g, p)] = r
                    elif r.get("format") != "hint":
                        (root / r["file"]).unlink(missing_ok=True)
            gate["graphs"][g] = {"tried": tried}
        for (g, p), r in kept.items():
            if r["format"] != "hint":
                final = root / f"{g}_{p}.onnx"
                os.replace(root / r["file"], final)
                r["file"] = final.name
            manifest["graphs"][g].setdefault("variants", {})[p] = {
                k: v for k, v in r.items() if k not in ("session", "passed")}
        for g, cands in todo.items():
            passing = {p: kept[(g, p)]["session"] for p in cands if (g, p) in kept and "session" in kept[(g, p)]}
            if passing and not plan.get("explicit", False):  # the speeds the pick compares
                gate["graphs"][g]["lockstep_ms"] = lockstep_ms({"fp32": base[g], **passing}, feeds.get(g, []))
            picks[g] = _pick(g, cands, kept, gate["graphs"][g], plan.get("explicit", False))
        _combined_check(bundle, picks, kept, base, ref_masks, videos, gate)
        drop_unpicked_compiles(root, picks, manifest)  # a bf16 Hiera tried but not picked: ~110 MB
    gate["seconds"] = round(time.perf_counter() - t_all, 1)
    gate["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    for (g, p), r in kept.items():
        manifest["graphs"][g]["variants"][p].pop("session", None)
    log.info("precision: " + ", ".join(f"{g} {p}" for g, p in picks.items() if p != "fp32") if
             any(p != "fp32" for p in picks.values()) else "precision: fp32 for every graph")
    return picks


def _bf16_unavailable() -> str | None:
    """Why a bf16 candidate cannot be gated here, or None where it can: bf16 runs through
    OpenVINO, which must report BF16 on this CPU. Reads the two probes (host.cpu_has_bf16,
    openvino_backend.device_has_bf16) that tests patch."""
    from fastsam2.runtime import openvino_backend

    if not openvino_backend.openvino_available():
        return "bf16 runs through OpenVINO: pip install fastsam2[openvino]"
    if not host.cpu_has_bf16():
        return "this CPU has no bf16 arithmetic (AVX512_BF16 or AMX)"
    if not openvino_backend.device_has_bf16("CPU"):
        return "OpenVINO reports no bf16 capability on this CPU"
    return None


def _report(g, name, r) -> None:
    worst = max(r["outputs"]["rel_max_abs_err"].items(), key=lambda kv: kv[1], default=("-", 0.0))
    masks = r["masks"]
    log.info(f"{g} {name}: {r['outputs']['ms_per_call']} ms/call, worst output error {worst[1]:.3g} of range "
             f"({worst[0]}), tracked masks vs fp32 IoU {masks['mean_iou'] if masks else 'n/a (non-finite)'}"
             f" -> {'passes' if r['passed'] else 'FAILS'} the gate (>= {MIN_MASK_IOU})")


def _pick(g, cands, kept, graph_gate, explicit) -> str:
    """The asked precision (explicit) or the fastest passing one, fp32 included (auto): by the
    lockstep timing where there is one, else by each candidate's own pass."""
    tried = graph_gate["tried"]
    wanted = [p for p in cands if p != "fp32"]
    if explicit:
        p = wanted[0]
        if (g, p) in kept:
            return p
        log.warning(f"warning: {g} stays fp32: its {p} variant " +
                    ("is not available here" if all("skipped" in v for k, v in tried.items() if k.startswith(p))
                     else "failed the agreement gate"))
        return "fp32"
    options = {"fp32": tried["fp32"]["ms_per_call"]}
    options.update({p: kept[(g, p)]["outputs"]["ms_per_call"] for p in wanted if (g, p) in kept})
    options.update({p: ms for p, ms in (graph_gate.get("lockstep_ms") or {}).items() if p in options})
    best = min(options, key=lambda p: options[p] if options[p] is not None else float("inf"))
    for p in wanted:
        if (g, p) in kept and p != best:
            log.info(f"note: {g} {p} passes the gate but is not the fastest here ({options[p]} vs "
                     f"{options[best]} ms/call for {best})")
    return best


def _combined_check(bundle, picks, kept, base, ref_masks, videos, gate) -> None:
    """All picked variants together must pass too; else the weakest goes back to fp32."""
    while sum(p != "fp32" for p in picks.values()) > 1:
        sessions = {**base, **{g: kept[(g, p)]["session"] for g, p in picks.items() if p != "fp32"}}
        m = mask_agreement(ref_masks, track_masks(bundle, sessions, videos))
        gate["combined"] = {"precision": dict(picks), "masks": m}
        if m["mean_iou"] >= MIN_MASK_IOU:
            return
        worst = min((g for g, p in picks.items() if p != "fp32"), key=lambda g: kept[(g, picks[g])]["masks"]["mean_iou"])
        log.warning(f"warning: the picked precisions together give tracked-mask IoU {m['mean_iou']} < "
                    f"{MIN_MASK_IOU}: {worst} goes back to fp32")
        picks[worst] = "fp32"


def upgrade_bundle(bundle_dir, requested: str = "auto", target: str | None = None, calibration_frames=None,
                   **gate_options) -> dict:
    """add_precision_variants on an existing bundle (written by an export without them), then
    manifest.json rewritten and the bundle resealed. Returns the manifest."""
    from fastsam2.profiles import load_profile
    from fastsam2.runtime import bundle as bundle_mod

    root = Path(bundle_dir)
    manifest = bundle_mod.load_bundle(root).manifest
    manifest.pop("seal", None)
    for g in manifest["graphs"].values():
        for v in (g.pop("variants", None) or {}).values():
            if v["file"] != g["file"]:
                (root / v["file"]).unlink(missing_ok=True)
    plan = precision_plan(load_profile(target or manifest["target"]), requested)
    add_precision_variants(root, manifest, plan, calibration_frames, **gate_options)
    from fastsam2.runtime.outputs import atomic_write_bytes

    atomic_write_bytes(root / "manifest.json", (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())
    if hasattr(bundle_mod, "reseal"):
        manifest = bundle_mod.reseal(root)
    return manifest


@click.command(cls=command_class(), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle")
@click.option("--precision", default="auto")
@click.option("--target", default=None, help="profile whose cpu_precisions 'auto' uses (default: the bundle's)")
@click.option("--calibration", default=None, help="video, frames folder, or engines/<target>/ of calib_*.npz")
@click.option("--threads", type=int, default=None)
@click.option("--gate-videos", type=int, default=2)
@click.option("--gate-frames", type=int, default=8)
def main(bundle, precision, target, calibration, threads, gate_videos, gate_frames):
    """Add gated reduced-precision variants to a bundle."""
    with cli_errors(), messages(err=True):
        m = upgrade_bundle(bundle, precision, target, calibration, threads=threads, gate_videos=gate_videos,
                           gate_frames=gate_frames)
    click.echo(json.dumps({"precision": m["precision"], "precision_gate": m["precision_gate"]}, indent=1))


if __name__ == "__main__":
    main(prog_name="python -m fastsam2.export.precision")
