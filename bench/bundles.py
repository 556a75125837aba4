"""The one way bench scripts get a bundle: `fastsam2-export` run in a child process (the bench
itself keeps torch out of its memory, and its RSS figures stay the runtime's), into a folder
under bench/out/, reused when that folder already holds a bundle exported with the same
settings (the manifest says so), exported again (--force) when it does not.

    from bundles import ensure_bundle
    b = ensure_bundle(ROOT / "bench/out/x_256", image_size=256)            # cpu, keep 1.0, fp32
    b = ensure_bundle(w / "bundle_1024", image_size=1024, gate="int8")     # + gated int8 variants

Weights are the exporter's seeded random init (checkpoint=None) unless a checkpoint file is
given; the text encoder is always the seeded random one (offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def request(image_size: int, *, target: str = "cpu", keep: float = 1.0, precision: str = "fp32",
            prompts: str = "object", config: str = "sam2.1_hiera_t", seed: int = 0,
            checkpoint: str | None = None) -> dict:
    """What a bench asks for, in the manifest's own terms (so a bundle can be matched to it)."""
    if checkpoint is not None:
        from fastsam2.runtime.bundle import sha256_file

        weights = {"sha256": sha256_file(checkpoint)}
    else:
        weights = {"sha256": "random", "seed": seed}
    return {"config": config, "image_size": int(image_size), "target": target, "keep": float(keep),
            "prompts": [p.strip() for p in prompts.split(",") if p.strip()], "checkpoint": weights,
            "text_random": True, "gated": precision != "fp32"}


def differences(manifest: dict, want: dict, gate: str | None = None) -> list:
    """Why `manifest` is not the bundle `want` describes ([] when it is). A bundle whose fp32
    export was gated afterwards (`gate`) matches an fp32 request that gates too."""
    ck = manifest.get("checkpoint") or {}
    have = {"config": manifest.get("config"), "image_size": manifest.get("image_size"),
            "target": manifest.get("target"), "keep": manifest.get("keep"), "prompts": manifest.get("prompts"),
            "checkpoint": {k: ck.get(k) for k in want["checkpoint"]},
            "text_random": bool((manifest.get("text") or {}).get("random")),
            "gated": bool((manifest.get("precision_gate") or {}).get("graphs"))}
    diff = [f"{k} {have[k]!r} != {v!r}" for k, v in want.items() if k != "gated" and have[k] != v]
    if not want["gated"] and gate is None and have["gated"]:
        diff.append("it holds gated precision variants (an fp32 bundle was asked for)")
    if want["gated"] and not have["gated"]:
        diff.append("it holds no gated precision variants")
    try:  # the objects batch axis (fastsam2 with batched objects): older bundles lack it
        from fastsam2.runtime.batched import bundle_batchable
    except ImportError:
        bundle_batchable = None
    if bundle_batchable is not None and not bundle_batchable(manifest):
        diff.append("its graphs have no objects batch axis (exported by an older fastsam2)")
    return diff


def ensure_bundle(out: Path, image_size: int, *, target: str = "cpu", keep: float = 1.0, precision: str = "fp32",
                  prompts: str = "object", config: str = "sam2.1_hiera_t", seed: int = 0,
                  checkpoint: str | None = None, gate: str | None = None, gate_args: dict | None = None,
                  threads: int | None = None, show: bool = False, log=print) -> Path:
    """The bundle at `out`, exported (or exported again) unless it matches. `gate`: a precision
    for `python -m fastsam2.export.precision` (variants through the agreement gate), run when
    the bundle has none yet. `show`: the children's output goes to this console (else it is
    captured, and shown only when a child fails)."""
    out = Path(out)
    want = request(image_size, target=target, keep=keep, precision=precision, prompts=prompts, config=config,
                   seed=seed, checkpoint=checkpoint)
    mf = out / "manifest.json"
    diff = differences(json.loads(mf.read_text()), want, gate) if mf.is_file() else ["no bundle there"]
    if diff:
        if mf.is_file():
            log(f"bundle {out} differs ({'; '.join(diff)}): exporting it again")
        cmd = ["-m", "fastsam2.export.cli", "--config", config, "--target", target, "--keep", f"{keep:g}",
               "--prompts", prompts, "--text-pretrained", "random", "--image-size", image_size,
               "--seed", seed, "--precision", precision, "--out", out, "--force"]
        _child(cmd + (["--checkpoint", checkpoint] if checkpoint else []), threads, show, log)
    else:
        log(f"bundle {out}: reused (matches {image_size} px, {target}, keep {keep:g}, {precision})")
    if gate is not None:
        add_variants(out, gate, gate_args, threads=threads, show=show, log=log)
    return out


def add_variants(bundle: Path, precision: str, gate_args: dict | None = None, *, threads: int | None = None,
                 show: bool = False, log=print) -> None:
    """`python -m fastsam2.export.precision BUNDLE --precision P` (variants through the
    agreement gate, in place), unless the bundle holds gated variants already. `gate_args`:
    that command's other options ({"gate_videos": 1} -> --gate-videos 1)."""
    if (json.loads((Path(bundle) / "manifest.json").read_text()).get("precision_gate") or {}).get("graphs"):
        return
    cmd = ["-m", "fastsam2.export.precision", bundle, "--precision", precision]
    for k, v in {"threads": threads, **(gate_args or {})}.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", v]
    _child(cmd, threads, show, log)


def export_facts(bundle: Path) -> dict:
    """What bench.py records about the export: its seconds and the versions that made it."""
    from importlib.metadata import PackageNotFoundError, version

    m = json.loads((Path(bundle) / "manifest.json").read_text())
    try:
        ort = version("onnxruntime")
    except PackageNotFoundError:
        ort = None
    return {"seconds": m.get("export_seconds"), "torch": m.get("torch_version"), "onnxruntime": ort,
            "sam2": m.get("sam2_version")}


def _child(args: list, threads: int | None, show: bool, log) -> None:
    cmd = [sys.executable, *[str(a) for a in args]]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log(" ".join(cmd[1:]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=not show)
    if p.returncode != 0:
        tail = "\n".join(((p.stderr or "") + (p.stdout or "")).strip().splitlines()[-15:])
        raise SystemExit(f"bench: `{' '.join(cmd[1:4])} ...` failed (exit {p.returncode})" + (f":\n{tail}" if tail else ""))
    log(f"  done in {time.perf_counter() - t0:.0f} s")
