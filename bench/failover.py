"""What a state store costs and what a failover takes (issue 22 §5), measured in one run.

    python bench/failover.py --bundle B [--frames 12] [--keep 0.5]

Starts a redis-server and three fastsam2-serve nodes on 127.0.0.1 (A and B share the store, C
has none), then:
  1. overhead: one stream on A (store) and one on C (no store), pushed frame by frame in
     alternation with the same frames, prompts and keep: median ms per frame of each, steady
     frames only (the bank full);
  2. failover: a stream on `A,B`; after frame 5, A is SIGKILLed (launcher, tritonserver, model
     processes); the next push's wall time (reconnect to B, restore from the store, the request
     the store lacked sent again, the frame) against the median frame;
  3. store traffic: the bytes the store holds after the last frame of stream 1 (base + chain).
Writes bench/results/failover_<S>px.json; docs/serving.md cites it. A benchmark: it never fails
on its numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEADY_FROM = 7


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(pred, timeout=300.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.5)
    raise TimeoutError("not ready in time")


def ready(http: int) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/fastsam2_tracker/ready", timeout=2) as r:
            return r.status == 200
    return False


def kill_tree(pid: int) -> None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError, ProcessLookupError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    os.killpg(int(d.name), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "failover")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    from fastsam2.calibration.synthetic import make_video
    from fastsam2.runtime import host
    from fastsam2.runtime.bundle import load_bundle
    from fastsam2.runtime.video import open_frames
    from fastsam2.serve.client import RemoteModel
    from fastsam2.serve.stream_state import stream_name

    a.work.mkdir(parents=True, exist_ok=True)
    size = load_bundle(a.bundle).manifest["image_size"]
    v = make_video(a.work / f"video_{a.frames}", num_frames=a.frames, size=(240, 320), seed=3, fmt="jpg")
    with open_frames(v.frames_dir_or_file) as src:
        rgbs = [rgb for _, rgb in src]
    procs = []
    try:
        rport = port()
        procs.append(subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(rport), "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL))
        store = f"redis://127.0.0.1:{rport}/0"
        nodes = {}
        for name, with_store in (("A", True), ("B", True), ("C", False)):
            http, grpc, metrics = port(), port(), port()
            cmd = [sys.executable, "-m", "fastsam2.serve.cli", "--bundle", str(a.bundle), "--repo",
                   str(a.work / f"repo{name}"), "--http-port", str(http), "--grpc-port", str(grpc),
                   "--metrics-port", str(metrics)] + (["--state-store", store] if with_store else [])
            if (a.work / f"repo{name}").exists():
                import shutil

                shutil.rmtree(a.work / f"repo{name}")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            nodes[name] = (procs[-1], f"127.0.0.1:{grpc}", http)
        for _, _, http in nodes.values():
            wait(lambda h=http: ready(h))

        def stream(url):
            s = RemoteModel(url, timeout=300).open_session(keep=a.keep, num_frames=a.frames,
                                                           frame_size=(v.width, v.height))
            s.add_prompt(1, points=[tuple(v.first_frame_points[1])])
            return s

        # 1. overhead of the store: the same stream on A (store) and C (none), alternating
        ms = {"store": [], "none": []}
        sa, sc = stream(nodes["A"][1]), stream(nodes["C"][1])
        for i, rgb in enumerate(rgbs):
            for key, s in ((("store", sa), ("none", sc)) if i % 2 else (("none", sc), ("store", sa))):
                t0 = time.perf_counter()
                s.push(rgb)
                ms[key].append((time.perf_counter() - t0) * 1e3)
        import redis

        r = redis.Redis.from_url(store)
        k = stream_name(sa.sequence_id, sa._token)
        from fastsam2.serve.state_store import stream_key

        base, chain = (f"fastsam2:{stream_key(k)}:{x}" for x in ("base", "chain"))
        stored = {"base_bytes": r.strlen(base), "chain_entries": r.llen(chain),
                  "chain_bytes": sum(len(x) for x in r.lrange(chain, 0, -1))}
        sa.close()
        sc.close()
        # 2. failover: a stream on A,B; A dies after frame 5
        sf = stream(f"{nodes['A'][1]},{nodes['B'][1]}")
        fo, node_before = [], sf.node
        for i, rgb in enumerate(rgbs):
            if i == 6:
                kill_tree(nodes["A"][0].pid)
            t0 = time.perf_counter()
            sf.push(rgb)
            fo.append((time.perf_counter() - t0) * 1e3)
        node_after = sf.node
        sf.close()
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                kill_tree(p.pid) if p.poll() is None else None

    def med(v):
        return round(float(np.median(v[STEADY_FROM:] or v[1:])), 1)

    steady = [x for i, x in enumerate(fo) if i >= 1 and i != 6]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": host.cpu_model(), "cpu_flags": host.cpu_features(), "cpus": host.usable_cpus(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"image_size": size, "frames": a.frames, "keep": a.keep, "video_hw": [v.height, v.width]},
        "overhead": {"ms_per_frame_with_store": med(ms["store"]), "ms_per_frame_without": med(ms["none"]),
                     "overhead_pct": round(100 * (med(ms["store"]) / med(ms["none"]) - 1), 1),
                     "frames_ms": {k: [round(x, 1) for x in v] for k, v in ms.items()}},
        "store_after_last_frame": stored,
        "failover": {"node_before": node_before, "node_after": node_after,
                     "first_frame_after_kill_ms": round(fo[6], 1), "median_frame_ms": round(float(np.median(steady)), 1),
                     "frames_ms": [round(x, 1) for x in fo]},
    }
    out = a.out or ROOT / "bench" / "results" / f"failover_{size}px.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k in ("overhead", "failover", "store_after_last_frame")},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
