"""fastsam2-calibrate: train the router without labels (`router`), record int8 data (`int8`).

Thin click layer over fastsam2.calibration.router_training and .int8; user errors become one
`error:` line and exit 2.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from fastsam2.runtime.errors import InputError, OutputError
from fastsam2.export.cli import echo_random_warnings, require_export_extra
from fastsam2.runtime.cli_edge import cli_errors, command_class, group_class
from fastsam2.runtime.console import messages


def _point(text: str) -> tuple:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--point must look like x,y (input pixels), got {text!r}") from None
    return x, y


def _echo_err(m: str) -> None:
    click.echo(m, err=True)


@click.group(cls=group_class(), context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Calibrate a fastsam2 model: router training and INT8 calibration data."""


@main.command("router", cls=command_class())
@click.option("--frames", "frames", multiple=True, required=True, help="Frames folder or video; repeat for several sequences.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Text of the tracked object: one, or one per --frames.")
@click.option("--point", "points", multiple=True, help="x,y first-frame click in input pixels, one per --frames (default: CLIP relevance argmax).")
@click.option("--config", default="sam2.1_hiera_t", show_default=True, help="SAM2 config name.")
@click.option("--checkpoint", default=None, help="Official SAM2 checkpoint (.pt); omit for a seeded random init (tests).")
@click.option("--image-size", type=int, default=1024, show_default=True, help="Model input size (the export's).")
@click.option("--text-model", default="ViT-B-32", show_default=True, help="open_clip model name (the export's).")
@click.option("--text-pretrained", default="laion2b_s34b_b79k", show_default=True, help="open_clip tag, or 'random'.")
@click.option("--text-checkpoint", default=None, help="Local open_clip checkpoint file.")
@click.option("--steps", type=int, default=300, show_default=True, help="Optimiser steps.")
@click.option("--lr", type=float, default=5e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch", type=int, default=8, show_default=True, help="Frames per step.")
@click.option("--max-frames", type=int, default=32, show_default=True, help="Frames used per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inits and sampling.")
@click.option("--out", default="router.pt", show_default=True, help="Router weights file to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
def router_cmd(frames, prompts, points, config, checkpoint, image_size, text_model, text_pretrained,
               text_checkpoint, steps, lr, batch, max_frames, seed, out, force):
    """Train the router's projections and uncertainty head from CLIP and unpruned SAM2 (no labels)."""
    # user errors: one line (without torch's weights_only advice), whatever the message held
    with cli_errors(_echo_err):
        require_export_extra("fastsam2-calibrate router")
        with warnings.catch_warnings(record=True) as caught, messages(err=True):
            warnings.simplefilter("always")
            meta = calibrate_router(frames, prompts, points, config, checkpoint, image_size, text_model,
                                    text_pretrained, text_checkpoint, steps, lr, batch, max_frames, seed,
                                    out, force)
        echo_random_warnings(caught)
        f = meta["final"]
        click.echo(f"wrote {out}: loss {meta['initial']['loss']:.4f} -> {f['loss']:.4f}, "
                   f"important-token recall {meta['recall_before']:.3f} -> {meta['recall_after']:.3f}")


def calibrate_router(frames, prompts, points=(), config="sam2.1_hiera_t", checkpoint=None,
                     image_size=1024, text_model="ViT-B-32", text_pretrained="laion2b_s34b_b79k",
                     text_checkpoint=None, steps=300, lr=5e-3, batch=8, max_frames=32, seed=0,
                     out="router.pt", force=False) -> dict:
    """Everything `fastsam2-calibrate router` does; returns the saved meta."""
    from fastsam2.runtime.video import open_frames

    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    for name, v, lo in (("--steps", steps, 1), ("--batch", batch, 1), ("--max-frames", max_frames, 1)):
        if v < lo:
            raise InputError(f"{name} must be >= {lo}, got {v}")
    if not lr > 0:
        raise InputError(f"--lr must be > 0, got {lr}")
    if len(prompts) not in (1, len(frames)):
        raise InputError(f"give one --prompt, or one per --frames ({len(frames)})")
    pts = [_point(p) for p in points] or None
    if pts is not None and len(pts) != len(frames):
        raise InputError(f"give one --point per --frames ({len(frames)}), or none")
    sources = [open_frames(f) for f in frames]  # fail on a bad path before loading any model
    try:
        for src, p in zip(sources, pts or ()):
            if not (0 <= p[0] < src.width and 0 <= p[1] < src.height):
                raise InputError(f"point {p[0]:g},{p[1]:g} is outside the {src.width}x{src.height} "
                                 f"frames of {src.name}")
        from fastsam2 import __version__
        from fastsam2.calibration.router_training import save_router, train_router
        from fastsam2.export.graphs.router import Router
        from fastsam2.export.model import PrunedSAM2
        from fastsam2.export.sam2_loader import load_sam2
        from fastsam2.export.text import TextEncoderSpec, load_text_encoder

        encoder = load_text_encoder(TextEncoderSpec(model=text_model, pretrained=text_pretrained,
                                                    checkpoint=text_checkpoint, seed=seed))
        loaded = load_sam2(config, checkpoint, image_size=image_size, seed=seed)
        dim = int(encoder.info["dim"])
        pruned = PrunedSAM2(loaded, router=Router(feat_dim=loaded.model.hidden_dim, text_dim=dim, seed=seed),
                            text_dim=dim)
        router, hist = train_router(pruned, encoder, sources, list(prompts), pts, steps=steps, lr=lr,
                                    seed=seed, max_frames=max_frames, batch=batch)
    finally:
        for s in sources:
            s.close()
    meta = {
        "fastsam2_version": __version__, "config": loaded.config, "image_size": image_size,
        "checkpoint_sha256": loaded.checkpoint_sha256 or "random",
        "text_model": encoder.info["model"], "text_pretrained": encoder.info["pretrained"],
        "text_checkpoint_sha256": encoder.info["checkpoint_sha256"], "text_random": encoder.info["random"],
        "prompts": hist["prompts"], "frames": [str(f) for f in frames], "start_points": hist["starts"],
        "steps": steps, "lr": lr, "batch": batch, "seed": seed,
        "initial": hist["initial"], "final": hist["final"],
        "recall_before": hist["recall_before"], "recall_after": hist["recall_after"],
        "important_fraction": hist["important_fraction"],
    }
    save_router(router, out, meta)
    return meta


def bundle_target(manifest: dict) -> str:
    """The bundle's target profile by name. A bundle exported for a TOML file records its path:
    never opened from the manifest (it may come from elsewhere); --target names it instead."""
    name = (manifest.get("engines") or {}).get("target") or manifest["target"]
    if "/" in name or "\\" in name or name.endswith(".toml"):
        raise InputError(f"the bundle was exported for the target file {name!r}: pass --target with that file")
    return name


def int8_keep(keep, bundle_dir, target):
    """The keep ratio to record at: --keep, else the bundle's; `auto` (a per-frame budget) records
    at the middle of the target's keep range, where export optimised the engines for auto."""
    from fastsam2.runtime.bundle import read_manifest
    from fastsam2.runtime.prompts import parse_keep

    manifest = read_manifest(bundle_dir)
    keep = parse_keep(manifest["keep"] if keep is None else keep)
    if keep != "auto":
        return keep, manifest
    lo_hi = (manifest.get("engines") or {}).get("keep_range")
    if not lo_hi:
        from fastsam2.profiles import load_profile

        p = load_profile(target or bundle_target(manifest))
        lo_hi = (p.keep_min, p.keep_max)
    return round((lo_hi[0] + lo_hi[1]) / 2, 4), manifest


@main.command("int8", cls=command_class())
@click.option("--bundle", "bundle_dir", required=True, help="Bundle folder written by fastsam2-export.")
@click.option("--frames", required=True, help="Representative frames folder or video.")
@click.option("--max-frames", type=int, default=32, show_default=True, help="Frames to record.")
@click.option("--target", default=None, help="Target profile (default: the bundle's).")
@click.option("--prompt", default=None, help="Bundle prompt to track (default: its first).")
@click.option("--point", default=None, help="x,y first-frame click in input pixels (default: text start).")
@click.option("--keep", default=None, help="Keep ratio in (0, 1] the engines will run at, or 'auto' (the middle "
                                           "of the target's keep range); default: the bundle's.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores).")
def int8_cmd(bundle_dir, frames, max_frames, target, prompt, point, keep, threads):
    """Record every graph's real inputs over FRAMES for TensorRT INT8 calibration (the inputs are
    recorded on ONNX Runtime's CPU provider: the graphs' own numbers, whatever runs them later)."""
    from fastsam2.calibration.int8 import write_int8_calibration

    with cli_errors(_echo_err), messages(err=True):
        keep, manifest = int8_keep(keep, bundle_dir, target)
        target = target or bundle_target(manifest)
        summary = write_int8_calibration(bundle_dir, frames, max_frames=max_frames, target=target,
                                         prompt=prompt, point=_point(point) if point else None,
                                         keep=keep, threads=threads)
        n = sum(g["batches"] for g in summary["graphs"].values())
        caches = ", ".join(summary["caches"]) or "no TensorRT here: build caches on the device"
        click.echo(f"wrote {len(summary['graphs'])} calibration files ({n} batches) to "
                   f"{summary['dir']}; caches: {caches}")


if __name__ == "__main__":
    main()
