"""Flat memory over a long video: fastsam2-run on a 1000-frame generated video, RSS sampled as
it goes. A benchmark (numbers go to docs/benchmarks.md), not a test.

    python bench/long_video.py [--frames 1000] [--image-size 256] [--keep 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bundles import ensure_bundle

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--keep", default="0.5")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "long")
    args = ap.parse_args(argv)

    from fastsam2.calibration.synthetic import make_video
    from fastsam2.runtime import host
    from fastsam2.runtime.track import PromptSpec, track

    args.out.mkdir(parents=True, exist_ok=True)
    vid = make_video(args.out / "video", num_frames=args.frames, size=(240, 320), seed=7, fmt="mp4")
    # exported in a child process: this one must hold only what the runtime loads (no torch)
    bundle = ensure_bundle(args.out / "bundle", args.image_size, prompts="cyclist", log=lambda m: None)
    samples = []

    def progress(i, total, frame):
        if i % 50 == 0 or i == args.frames - 1:
            samples.append({"frame": i, "rss_mb": host.rss_mb(), "frame_ms": frame["frame_ms"]})

    t0 = time.perf_counter()
    res = track(vid.frames_dir_or_file, bundle, PromptSpec(text="cyclist", points=[vid.first_frame_points[1]]),
                args.out / "results", keep=args.keep, backend="ort-cpu", overlay=True, progress=progress,
                warn=lambda m: None)
    frame_ms = [f["frame_ms"] for f in res["frames"]]
    report = {
        "frames": len(frame_ms), "image_size": args.image_size, "keep": args.keep,
        "torch_loaded": "torch" in sys.modules,
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_samples": samples,
        "rss_growth_mb_frame100_to_last": round(samples[-1]["rss_mb"] - next(s for s in samples if s["frame"] >= 100)["rss_mb"], 1),
        "peak_rss_mb": host.peak_rss_mb(),
        "median_ms_frames_10_60": sorted(frame_ms[10:60])[25],
        "median_ms_last_50": sorted(frame_ms[-50:])[25],
    }
    report["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = json.dumps(report, indent=2)
    (args.out / "long_video.json").write_text(text)
    # the committed copy docs/benchmarks.md cites
    committed = ROOT / "bench" / "results" / f"long_video_{args.image_size}px.json"
    committed.parent.mkdir(parents=True, exist_ok=True)
    committed.write_text(text)
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
