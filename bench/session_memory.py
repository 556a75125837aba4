"""The streaming session over a long run with prompts and objects coming and going: per-frame
latency with and without prompts, RSS and memory-bank bytes as it goes. A benchmark (numbers go
to docs/benchmarks.md, JSON to bench/results/session_memory.json), not a test.

    python bench/session_memory.py [--frames 1000] [--prompts 50] [--image-size 256] [--keep 0.5]

Schedule (deterministic): `prompts` prompt events plus removals, evenly spread, cycling through
PATTERN: objects start with a click, get new clicks or a box on later frames, and are removed;
up to 4 objects live at once (a start with 4 live becomes a click, a removal with none live a
start); ids are reused after removal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PATTERN = ("start", "click", "start", "box", "start", "click", "remove", "start", "box", "remove")
sys.path.insert(0, str(ROOT / "bench"))
from bundles import ensure_bundle  # noqa: E402
from fastsam2.runtime.prompts import parse_keep


def frames(n: int, size=(240, 320)):
    """n frames of a 96-frame generated clip played forwards and backwards (the bank sees an
    endless video; generating 1000 distinct frames would only cost time)."""
    from fastsam2.calibration.synthetic import make_video

    tmp = ROOT / "bench" / "out" / "session_clip"
    vid = make_video(tmp, num_frames=96, size=size, seed=11, objects=3, fmt="jpg")
    from PIL import Image

    clip = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(vid.frames_dir_or_file.iterdir())]
    order = list(range(len(clip))) + list(range(len(clip) - 2, 0, -1))  # there and back
    for i in range(n):
        src = order[i % len(order)]
        yield i, clip[src], vid, src


def _median(xs):
    return round(float(np.median(xs)), 1) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--keep", default="0.5")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "session_memory.json")
    args = ap.parse_args(argv)

    from fastsam2.runtime import host
    from fastsam2.runtime.session import Session

    # exported in a child process: this one must hold only what the runtime loads (no torch)
    bundle = ensure_bundle(ROOT / "bench" / "out" / f"session_bundle_{args.image_size}", args.image_size,
                           prompts="cyclist", log=lambda m: None)
    per_cycle = sum(k != "remove" for k in PATTERN)
    n_events = -(-args.prompts * len(PATTERN) // per_cycle)  # enough cycles for `prompts` prompts
    every = max(1, args.frames // n_events)
    live, events = [], []
    samples, lat_prompt, lat_plain = [], [], []
    by_objects = {}  # live objects during the push -> {"prompt": [ms], "plain": [ms]}
    t0 = time.perf_counter()
    with Session.open(bundle, keep=parse_keep(args.keep), backend="ort-cpu",
                      threads=args.threads, warn=lambda m: None) as s:
        for i, rgb, vid, src in frames(args.frames):
            prompted = False
            done = sum(e["kind"] != "remove" for e in events)
            if i % every == 0 and done < args.prompts:
                kind = PATTERN[len(events) % len(PATTERN)]
                if kind == "start" and len(live) >= 4:
                    kind = "click"
                if kind != "start" and not live:
                    kind = "start"
                if kind == "start":
                    obj = next(o for o in range(1, 10) if o not in live)
                    gt = vid.read_mask(src)
                    ys, xs = np.nonzero(gt > 0) if (gt > 0).any() else (np.array([120]), np.array([160]))
                    j = (len(events) * 7919) % len(xs)
                    s.add_prompt(obj, points=[(float(xs[j]), float(ys[j]))])
                    live.append(obj)
                elif kind == "click":
                    s.add_prompt(live[len(events) % len(live)], points=[(100.0 + len(events) % 100, 120.0)])
                elif kind == "box":
                    s.add_prompt(live[len(events) % len(live)], box=(60.0, 60.0, 200.0, 180.0))
                else:
                    s.remove(live.pop(0))
                events.append({"frame": i, "kind": kind, "objects_after": list(live)})
                prompted = kind != "remove"
            t = time.perf_counter()
            s.push(rgb)
            ms = (time.perf_counter() - t) * 1e3
            (lat_prompt if prompted else lat_plain).append(ms)
            by_objects.setdefault(len(s.objects), {"prompt": [], "plain": []})["prompt" if prompted else "plain"].append(ms)
            if i % 50 == 0 or i == args.frames - 1:
                samples.append({"frame": i, "rss_mb": host.rss_mb(), "bank_mb": round(s.memory_bytes() / 1e6, 2),
                                "objects": len(s.objects)})
    after100 = [x for x in samples if x["frame"] >= 100]
    report = {
        "frames": args.frames, "prompts": sum(e["kind"] != "remove" for e in events),
        "removals": sum(e["kind"] == "remove" for e in events), "image_size": args.image_size,
        "keep": args.keep, "threads": args.threads, "cpu_count": os.cpu_count(),
        "loadavg_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "objects_live_max": max(x["objects"] for x in samples),
        "torch_loaded": "torch" in sys.modules, "seconds": round(time.perf_counter() - t0, 1),
        "frame_ms_with_prompt_median": round(float(np.median(lat_prompt)), 1) if lat_prompt else None,
        "frame_ms_without_prompt_median": round(float(np.median(lat_plain)), 1),
        "frame_ms_without_prompt_p90": round(float(np.percentile(lat_plain, 90)), 1),
        # a frame's cost grows with the objects tracked (each has its own memory attention and
        # decoder pass; the image encoder runs once), so the medians above mix 1 to 4 objects
        "frame_ms_median_by_live_objects": {
            str(n): {"frames_plain": len(v["plain"]), "plain": _median(v["plain"]),
                     "frames_with_prompt": len(v["prompt"]), "with_prompt": _median(v["prompt"])}
            for n, v in sorted(by_objects.items())},
        "rss_mb_min_max_after_frame_100": [min(x["rss_mb"] for x in after100), max(x["rss_mb"] for x in after100)],
        "rss_growth_mb_frame100_to_last": round(samples[-1]["rss_mb"] - after100[0]["rss_mb"], 1),
        "peak_rss_mb": host.peak_rss_mb(),
        "samples": samples, "events": events,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "events")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
