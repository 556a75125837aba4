"""Session snapshot sizes: full snapshot and per-frame increment bytes per object, at several
keep ratios (runtime/snapshot.py). A benchmark (JSON to bench/results/snapshot_size.json), not
a test.

    python bench/snapshot_size.py [--sizes 256,1024] [--keeps 1.0,0.5,0.3] [--frames 12]

A snapshot holds no compression and its layout depends only on the bundle's geometry and the
keep ratio (kept tokens per memory entry), not on the values. So each size runs either the real
graphs of an exported bundle ("graphs": "onnx") or stand-ins that return arrays of the graphs'
shapes ("graphs": "shapes", the bundle's settings and constants widened to the size): at 256 px
both run, and the JSON records that their byte counts agree, so the 1024-px numbers need no
1024-px export (minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bundles import ensure_bundle
from fastsam2.runtime.prompts import parse_keeps

ROOT = Path(__file__).resolve().parents[1]


def bundle_256() -> Path:
    # exported in a child process: this one must hold only what the runtime loads (no torch)
    return ensure_bundle(ROOT / "bench" / "out" / "session_bundle_256", 256, prompts="cyclist", log=lambda m: None)


class ShapeGraph:
    """A graph stand-in: outputs of the contract's shapes (seeded values; sizes are what count)."""

    def __init__(self, name: str, S: int, rng):
        self.name, self.G, self.rng = name, S // 16, rng

    def run(self, feeds: dict) -> dict:
        G, r = self.G, self.rng
        f = lambda *shape: r.standard_normal(shape).astype(np.float32)  # noqa: E731
        if self.name == "image_encoder":
            return {"feat": f(1, 256, G, G), "high_res_0": f(1, 32, 4 * G, 4 * G), "high_res_1": f(1, 64, 2 * G, 2 * G)}
        if self.name == "router":
            return {"scores": f(1, G * G), "relevance": f(1, G * G)}
        if self.name == "memory_attention":
            return {"conditioned": f(feeds["curr"].shape[0], 256)}
        if self.name == "memory_encoder":
            return {"maskmem": f(1, 64, G, G)}
        return {"masks": f(1, 4, 4 * G, 4 * G), "iou": f(1, 4), "obj_ptrs": f(1, 4, 256),
                "object_score": np.full((1, 1), 1.0, np.float32)}


def session_for(bundle, S: int, keep: float, graphs: str):
    from fastsam2.runtime.session import Session, keep_range

    if graphs == "onnx":
        return Session.open(bundle, keep=keep, backend="ort-cpu", threads=2, warn=lambda m: None)
    T = (S // 16) ** 2
    consts = dict(bundle.constants)
    for name in ("vision_pos", "maskmem_pos"):  # per-token tables: widened by repetition
        consts[name] = np.resize(consts[name], (T, consts[name].shape[1])).astype(np.float32)
    rng = np.random.default_rng(0)
    sessions = {n: ShapeGraph(n, S, rng) for n in ("image_encoder", "router", "memory_attention",
                                                    "memory_encoder", "mask_decoder")}
    s = Session(sessions, consts, {**bundle.settings, "image_size": S}, text_embeddings=bundle.text_embeddings,
                keep=keep, keep_floor=bundle.manifest.get("keep_floor", 64), keep_range=keep_range(bundle))
    s.bundle = bundle
    return s


def measure(bundle, S: int, keep: float, graphs: str, n_frames: int) -> dict:
    from fastsam2.runtime.snapshot_format import unpack

    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(n_frames)]
    sizes = {}
    for objects in (0, 1, 2):
        s = session_for(bundle, S, keep, graphs)
        for o in range(1, objects + 1):
            s.add_prompt(o, points=[(60.0 * o, 100.0)])
        incs = []
        s.snapshot_delta()
        for rgb in frames:
            s.push(rgb)
            incs.append(s.snapshot_delta())
        full = s.snapshot()
        sizes[objects] = {"full": len(full), "increments": [len(x) for x in incs[-4:]], "last_increment": incs[-1]}
    meta, arrays = unpack(sizes[1]["last_increment"])
    entry = sum(a.nbytes for k, a in arrays.items() if ".slot" in k)
    per_obj_full = sizes[2]["full"] - sizes[1]["full"]
    per_obj_inc = int(np.median(sizes[2]["increments"])) - int(np.median(sizes[1]["increments"]))
    return {
        "image_size": S, "keep": keep, "graphs": graphs, "frames_pushed": n_frames, "tokens": (S // 16) ** 2,
        "kept_tokens": int(meta["objects"]["1"]["slots"][0][2]),
        "full_snapshot_bytes_per_object": per_obj_full,
        "increment_bytes_per_object": per_obj_inc,
        "increment_memory_entry_bytes": int(entry),
        "increment_logits_bytes": int(sum(a.nbytes for k, a in arrays.items() if k.endswith(".logits"))),
        "empty_session_snapshot_bytes": sizes[0]["full"],
        "empty_session_increment_bytes": int(np.median(sizes[0]["increments"])),
        "full_snapshot_bytes_one_object": sizes[1]["full"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--keeps", default="1.0,0.5,0.3")
    ap.add_argument("--frames", type=int, default=12)  # past num_maskmem = 7: the ring is full
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "snapshot_size.json")
    args = ap.parse_args(argv)
    from fastsam2.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_256())
    rows = []
    for S in (int(x) for x in args.sizes.split(",")):
        for keep in parse_keeps(args.keeps):
            for graphs in (("onnx", "shapes") if S == bundle.settings["image_size"] else ("shapes",)):
                row = measure(bundle, S, keep, graphs, args.frames)
                rows.append(row)
                print(json.dumps(row))
    agree = {}
    for r in rows:
        if r["graphs"] == "onnx":
            twin = next(x for x in rows if x["graphs"] == "shapes" and x["image_size"] == r["image_size"]
                        and x["keep"] == r["keep"])
            keys = ("full_snapshot_bytes_per_object", "increment_bytes_per_object", "kept_tokens")
            agree[f"{r['image_size']}px keep {r['keep']}"] = all(r[k] == twin[k] for k in keys)
    report = {"what": "session snapshot and per-frame increment bytes per object (runtime/snapshot.py)",
              "note": "per object = the difference between sessions of 2 and 1 objects; increments are the "
                      "median of the last 4 frames' snapshot_delta() after the memory ring filled",
              "onnx_and_shape_graphs_agree": agree, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| px | keep | kept tokens | full snapshot / object | increment / object | of which memory entry |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["graphs"] == "shapes":
            print(f"| {r['image_size']} | {r['keep']} | {r['kept_tokens']} | {r['full_snapshot_bytes_per_object'] / 1e3:.1f} kB "
                  f"| {r['increment_bytes_per_object'] / 1e3:.1f} kB | {r['increment_memory_entry_bytes'] / 1e3:.1f} kB |")
    print(f"onnx == shapes at 256 px: {agree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
