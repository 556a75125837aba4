"""fastsam2-export: pruned SAM2 -> five ONNX graphs + text embeddings + engines or build plan."""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from pathlib import Path

import click

from fastsam2.runtime.cli_edge import cli_errors, command_class
from fastsam2.runtime.console import messages
from fastsam2.runtime.errors import FastSam2Error, InputError

from .engines_step import engines_step

# what the [export] extra brings (pyproject.toml): the torch side of fastsam2
EXPORT_MODULES = ("torch", "sam2", "onnx", "open_clip")
def require_export_extra(command: str) -> None:
    """FastSam2Error naming the extra to install, where the torch side is missing (a device
    with the runtime extra only): one line instead of a torch ImportError traceback."""
    missing = []
    for mod in EXPORT_MODULES:
        try:
            importlib.import_module(mod)
        except (ImportError, OSError):  # OSError: a torch wheel whose CUDA libraries are missing
            missing.append(mod)
    if missing:
        raise FastSam2Error(f"{command} needs the export extra (missing: {', '.join(missing)}): "
                            'pip install "fastsam2[export]"')


def _echo_random(message, shown: set) -> None:
    """One `warning:` line for a random-weights warning not shown yet; other warnings are dropped."""
    text = str(message).splitlines()[0] if str(message) else ""
    if "random" in text and text not in shown:
        shown.add(text)
        click.echo(f"warning: {text}", err=True)


def echo_random_warnings(caught) -> None:
    """One `warning:` line per distinct random-weights warning caught while building models."""
    shown = set()
    for w in caught:
        _echo_random(w.message, shown)


@contextlib.contextmanager
def random_warnings_echoed():
    """Inside the block each distinct random-weights warning is one `warning:` line the moment it
    is raised (before the minutes of work it qualifies, not after them); other warnings are dropped."""
    shown = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: _echo_random(message, shown)
        yield


def export_bundle(config="sam2.1_hiera_t", checkpoint=None, target="cpu", keep=0.5, prompts=None,
                  prompts_file=None, text_model="ViT-B-32", text_pretrained="laion2b_s34b_b79k",
                  text_checkpoint=None, image_size=1024, opset=17, out="bundle", force=False,
                  seed=0, router_weights=None, precision="auto", calibration=None) -> dict:
    """The library function behind the command (tests call it directly). Every argument is
    checked, and the output folder, before any model is built; without a checkpoint the
    random-weights warning is raised then, before the work. Progress goes to the
    fastsam2.export.* loggers."""
    from fastsam2.export.out_dir import prepare_out_dir
    from fastsam2.export.sam2_loader import check_sam2_args, load_sam2, random_weights_warning
    from fastsam2.profiles import load_profile

    from fastsam2.runtime.prompts import parse_keep

    keep = parse_keep(keep)
    if opset > 17 or opset < 14:
        raise InputError(f"--opset must be 14..17 (TensorRT 8.6 on JetPack 6.0 parses <= 17), got {opset}")
    profile = load_profile(target)
    if profile.tensorrt and keep != "auto" and not (profile.keep_min <= keep <= profile.keep_max):
        raise InputError(f"--keep {keep} is outside target {target}'s range {profile.keep_min}..{profile.keep_max}")
    from fastsam2.export.text import TextEncoderSpec, compute_text_embeddings, parse_prompts

    prompt_list = parse_prompts(prompts, prompts_file)
    from fastsam2.export.precision import precision_plan

    plan = precision_plan(profile, precision)  # a bad --precision fails before minutes of work
    config = check_sam2_args(config, image_size)
    out = Path(out)
    prepare_out_dir(out, force)  # fail before minutes of work, not after
    if not checkpoint:
        warnings.warn(random_weights_warning(config), stacklevel=2)

    from fastsam2.export.model import PrunedSAM2
    from fastsam2.export.onnx_export import write_bundle

    loaded = load_sam2(config, checkpoint, image_size=image_size, seed=seed, warn=False)
    spec = TextEncoderSpec(model=text_model, pretrained=text_pretrained, checkpoint=text_checkpoint,
                           seed=seed)
    emb, text_info = compute_text_embeddings(prompt_list, spec)
    router = None
    if router_weights:
        from .router_weights import load_router

        router = load_router(router_weights, text_info["dim"])
    pruned = PrunedSAM2(loaded, router=router, text_dim=text_info["dim"])
    return write_bundle(pruned, out, keep=keep, target=target, opset=opset, text_embeddings=emb,
                        text_info=text_info, force=force, profile=profile,
                        engines_hook=engines_step(profile, keep), precision_plan=plan,
                        calibration_frames=calibration)


def _list_targets(ctx, param, value) -> None:
    """--list-targets is eager: it prints and exits before --out and --target are required."""
    if not value or ctx.resilient_parsing:
        return
    from fastsam2.profiles import list_targets, load_profile

    with cli_errors(echo=lambda m: click.echo(m, err=True)):
        for name in list_targets():
            p = load_profile(name)
            click.echo(f"{name:18s} {p.precision:5s} {p.description}")
    ctx.exit()


@click.command(cls=command_class(), context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", default="sam2.1_hiera_t", show_default=True, help="SAM2 config name (sam2.1_hiera_t/s/b+/l, sam2_hiera_*).")
@click.option("--checkpoint", type=str, default=None, help="Official SAM2 checkpoint (.pt). Omit for a seeded random init (tests/offline demo; masks are not meaningful).")
@click.option("--target", required=True, help="Target profile from profiles/ (see --list-targets).")
@click.option("--keep", default="0.5", show_default=True, help="Default keep ratio in (0, 1] (fraction of tokens entering memory attention; centre of the TensorRT profiles), or 'auto'.")
@click.option("--prompts", default=None, help='Comma-separated text prompts to precompute, e.g. "cyclist,red soccer ball" (this, --prompts-file or both).')
@click.option("--prompts-file", type=str, default=None, help="File with one prompt per line (# comments allowed).")
@click.option("--text-model", default="ViT-B-32", show_default=True, help="open_clip model name.")
@click.option("--text-pretrained", default="laion2b_s34b_b79k", show_default=True, help="open_clip pretrained tag, or 'random' for a seeded random init (offline tests).")
@click.option("--text-checkpoint", type=str, default=None, help="Local open_clip checkpoint file (instead of downloading the tag).")
@click.option("--image-size", type=int, default=1024, show_default=True, help="Model input size (SAM2 uses 1024; any multiple of 16).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (<= 17 for TensorRT 8.6 / JetPack 6.0).")
@click.option("--out", type=str, required=True, help="Bundle folder to write (a new folder, or with --force an earlier bundle or an empty folder).")
@click.option("--force", is_flag=True, help="Replace an earlier bundle (or an empty folder) at --out; nothing else is ever replaced.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inits (SAM2 without --checkpoint, CLIP with 'random', the router).")
@click.option("--router-weights", type=str, default=None, help="Trained router (fastsam2-calibrate router); without it the text term is untrained and the manifest says so.")
@click.option("--precision", default="auto", show_default=True,
              help="CPU precision per graph: auto (the target's cpu_precisions: the fastest that passes the "
                   "agreement gate on this machine), fp32, int8, bf16, or graph=precision,...")
@click.option("--calibration", default=None,
              help="int8 calibration frames: a video, a frames folder, or engines/<target>/ from "
                   "fastsam2-calibrate int8 (default: a generated video).")
@click.option("--list-targets", is_flag=True, is_eager=True, expose_value=False, callback=_list_targets,
              help="List the target profiles and exit.")
def main(config, checkpoint, target, keep, prompts, prompts_file, text_model, text_pretrained,
         text_checkpoint, image_size, opset, out, force, seed, router_weights, precision, calibration):
    """Export the pruned SAM2 as a bundle for fastsam2-run."""
    # Ctrl-C and SIGTERM unwind the export as exceptions: its temp folder is removed on the way out
    with cli_errors(echo=lambda m: click.echo(m, err=True),
                    interrupted=f"nothing written (the partial bundle was removed; {out} is as it was)"):
        if not target.strip():
            raise InputError("--target is empty (see --list-targets)")
        if not out.strip():
            raise InputError("--out is empty")
        require_export_extra("fastsam2-export")
        # open_clip logs "No pretrained weights loaded" on the root logger for random inits;
        # the one warning line it raises says it in our words
        logging.getLogger().setLevel(logging.ERROR)
        with random_warnings_echoed(), messages(err=True):
            manifest = export_bundle(config, checkpoint, target, keep, prompts, prompts_file, text_model,
                                     text_pretrained, text_checkpoint, image_size, opset, out, force, seed,
                                     router_weights, precision=precision, calibration=calibration)
        sizes = sum(g["bytes"] for g in manifest["graphs"].values()) / 1e6
        reduced = {g: p for g, p in (manifest.get("precision") or {}).items() if p != "fp32"}
        click.echo(f"wrote bundle {out} ({sizes:.1f} MB of ONNX, {manifest['export_seconds']:.1f} s, "
                   f"target {target}, keep {keep}"
                   + (", " + ", ".join(f"{g} {p}" for g, p in reduced.items()) if reduced else "") + ")")


if __name__ == "__main__":
    main()
