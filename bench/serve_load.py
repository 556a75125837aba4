"""Load benchmark of fastsam2-serve: N concurrent streams against one real Triton server.

For each concurrency (default 1, 2, 4, 8) every stream opens its own Triton sequence, clicks
its object on frame 0 and pushes the same pre-decoded frames as fast as the server answers
(one request in flight per stream, as `fastsam2-run --server` does). Reported per concurrency:
aggregate FPS (frames of all streams / wall time), p50 / p99 frame latency seen by the clients
(first frame of each stream, the prompt frame, excluded), and the tracker process's RSS per live
session (its RSS with N sessions after the last frame minus its RSS with none, / N), read from
the server's own metrics (fastsam2_process_rss_bytes, fastsam2_memory_bank_bytes).

    python bench/serve_load.py --size 256                         # exports a bundle if none given
    python bench/serve_load.py --size 1024 --bundle b1024/ --frames 12

Writes bench/results/serve_load_<size>.json. A benchmark, not a test: it never fails on numbers.
The server binds 127.0.0.1 on free ports and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bundles import ensure_bundle

ROOT = Path(__file__).resolve().parent.parent


def log(msg):
    print(f"[serve_load] {msg}", file=sys.stderr, flush=True)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def frames_and_click(n: int, seed: int = 7):
    from PIL import Image

    from fastsam2.calibration.synthetic import make_video

    v = make_video(Path(tempfile.mkdtemp(prefix="serve_load_video_")), num_frames=n, size=(480, 640), seed=seed)
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(v.frames_dir_or_file.glob("*.jpg"))]
    return frames, v.first_frame_points[1]


def one_level(url: str, metrics_url: str, streams: int, frames: list, click, keep) -> dict:
    from fastsam2.serve.client import RemoteModel, read_metrics

    model = RemoteModel(url, timeout=1800)
    base = read_metrics(metrics_url)
    sessions = [model.open_session(keep=keep, frame_size=(frames[0].shape[1], frames[0].shape[0]))
                for _ in range(streams)]
    latencies = [[] for _ in range(streams)]
    errors = []
    barrier = threading.Barrier(streams)

    def run(i):
        s = sessions[i]
        try:
            s.add_prompt(1, points=[click])
            barrier.wait(timeout=600)
            for rgb in frames:
                t0 = time.perf_counter()
                s.push(rgb)
                latencies[i].append((time.perf_counter() - t0) * 1e3)
        except BaseException as e:  # reported in the JSON
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    held = read_metrics(metrics_url)
    for s in sessions:
        s.close()
    time.sleep(0.5)
    after = read_metrics(metrics_url)
    steady = [x for lat in latencies for x in lat[1:]]
    done = sum(len(lat) for lat in latencies)
    rss_held, rss_base = held["fastsam2_process_rss_bytes"], base["fastsam2_process_rss_bytes"]
    return {
        "streams": streams, "frames_per_stream": len(frames), "frames_done": done, "wall_s": round(wall, 2),
        "aggregate_fps": round(done / wall, 3) if wall > 0 else None,
        "latency_ms_p50": round(float(np.percentile(steady, 50)), 1) if steady else None,
        "latency_ms_p99": round(float(np.percentile(steady, 99)), 1) if steady else None,
        "server_rss_mb_idle": round(rss_base / 2**20, 1), "server_rss_mb_with_sessions": round(rss_held / 2**20, 1),
        "server_rss_mb_per_session": round((rss_held - rss_base) / streams / 2**20, 2),
        "memory_bank_mb_per_session": round(held["fastsam2_memory_bank_bytes"] / streams / 2**20, 2),
        "server_rss_mb_after_close": round(after["fastsam2_process_rss_bytes"] / 2**20, 1),
        "errors": errors,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image size of the exported bundle (256 or 1024)")
    p.add_argument("--bundle", help="bundle folder (default: export a seeded random one at --size)")
    p.add_argument("--streams", default="1,2,4,8", help="concurrency levels")
    p.add_argument("--frames", type=int, default=12, help="frames per stream")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--instances", type=int, default=1, help="tracker model instances (processes)")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--out", help="JSON path (default bench/results/serve_load_<size>.json)")
    a = p.parse_args(argv)

    from fastsam2.serve.repository import default_threads, write_repository
    from fastsam2.serve.server import TritonServer

    levels = [int(x) for x in a.streams.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    # default: a seeded random-init bundle (exported in a child process, reused when it matches)
    bundle = Path(a.bundle) if a.bundle else ensure_bundle(ROOT / "bench" / "out" / f"serve_bundle_{a.size}", a.size,
                                                           log=log)
    write_repository(bundle, work / "repo", instances=a.instances, backend=a.backend,
                     max_sessions=max(levels), idle_timeout=600)
    frames, click = frames_and_click(a.frames)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(work / "repo", http_port=http, grpc_port=grpc, metrics_port=metrics)
    results = []
    log(f"starting tritonserver on 127.0.0.1:{grpc}")
    with server:
        url, murl = server.grpc_url, f"http://127.0.0.1:{metrics}/metrics"
        one_level(url, murl, 1, frames[:2], click, a.keep)  # warm-up: sessions, arenas, first-run costs
        for n in levels:
            log(f"{n} concurrent stream(s) x {a.frames} frames")
            r = one_level(url, murl, n, frames, click, a.keep)
            log(json.dumps(r))
            results.append(r)
    from fastsam2.runtime.bundle import load_bundle

    b = load_bundle(bundle)
    report = {
        "what": "fastsam2-serve load: N concurrent streams, one Triton server (nvidia-pytriton's tritonserver, "
                "python backend, tracker in-process on ONNX Runtime CPU)",
        "image_size": b.settings["image_size"], "keep": a.keep, "instances": a.instances, "backend": a.backend,
        "threads_per_instance": default_threads(a.instances), "frame_size": list(frames[0].shape[:2]),
        "weights_random": b.manifest.get("weights_random"),
        "host": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "machine": platform.machine(),
                 "python": platform.python_version(), "load_avg_at_end": os.getloadavg()},
        "levels": results,
    }
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"serve_load_{b.settings['image_size']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
