"""fastsam2-export: pruned SAM2 -> five ONNX graphs + text embeddings + engines or build plan."""

from __future__ import annotations

import importlib
import logging
import re
import sys
import warnings
from pathlib import Path

import click

from fastsam2.runtime.cli_edge import ANSI, NOT_UNPICKLED, one_line
from fastsam2.runtime.errors import FastSam2Error, InputError

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


def torch_load_reason(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, without torch's advice to turn
    weights_only off (which would run the file's code): for the checkpoint and router loaders."""
    text = ANSI.sub("", str(exc))
    if "Weights only load failed" in text:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
        return f"{NOT_UNPICKLED}: {' '.join(m.group(1).split())}" if m else NOT_UNPICKLED
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def _engines_hook(profile, keep: float, log):
    """Build engines when the target's GPU is this machine's; otherwise write the build plan."""

    def hook(tmp: Path, manifest: dict) -> dict:
        if not profile.tensorrt:
            return {}
        from fastsam2.export.tensorrt import build_engines, check_engines, shape_profiles, write_build_plan
        from fastsam2.runtime.contract import dynamic_inputs
        from fastsam2.runtime.trt_backend import current_gpu, tensorrt_available

        s = manifest["model"]
        # `auto` varies k per frame over the whole profile range: optimise for its middle
        opt_keep = (profile.keep_min + profile.keep_max) / 2 if keep == "auto" else keep
        shapes = shape_profiles(profile, manifest["image_size"], opt_keep, s["num_maskmem"],
                                s["max_obj_ptrs_in_encoder"], s["text_dim"])
        plan = write_build_plan(tmp, profile, shapes)
        info = {"target": profile.name, "keep_range": [profile.keep_min, profile.keep_max],
                "precision": profile.precision, "workspace_mib": profile.workspace_mib,
                "builder_optimization_level": profile.builder_optimization_level,
                "dla_core": profile.dla_core, "max_points": profile.max_points,
                # the runtime's ONNX Runtime TensorRT provider builds with the same profiles
                "profile_shapes": {g: {n: [list(x) for x in shapes[g][n]] for n in dynamic_inputs(g)}
                                   for g in shapes if dynamic_inputs(g)},
                "build_plan": str(plan.relative_to(tmp)), "built": False}
        gpu = current_gpu() if tensorrt_available() else None
        if gpu and gpu.get("compute_capability") == profile.compute_capability:
            built = build_engines(tmp, profile, shapes, log=log)
            built["checks"] = _finite_checks(check_engines(tmp, built, shapes, profile.precision))
            bad = [g for g, r in built["checks"].items() if not r["passed"]]
            for g in bad:
                # a null error is a non-finite one: the worst there is
                worst = max(built["checks"][g]["outputs"].items(),
                            key=lambda kv: float("inf") if kv[1]["max_abs_err"] is None or not kv[1]["tol"]
                            else kv[1]["max_abs_err"] / kv[1]["tol"])
                err, tol = worst[1]["max_abs_err"], worst[1]["tol"]
                log(f"warning: {g} engine differs from ONNX Runtime beyond tolerance ({worst[0]}: max abs "
                    f"error {'non-finite' if err is None else format(err, '.3g')} > "
                    f"{'?' if tol is None else format(tol, '.3g')})")
            log(f"engine checks vs ONNX Runtime: {len(built['checks']) - len(bad)}/{len(built['checks'])} "
                "within tolerance")
            prefix = f"engines/{profile.name}/"
            built["graphs"] = {g: {**v, "file": prefix + Path(v["file"]).name} for g, v in built["graphs"].items()}
            info.update(built, built=True)
            log(f"built {len(built['graphs'])} TensorRT engines for {gpu['gpu_name']}")
        else:
            where = f"a {gpu['gpu_name']}" if gpu else "no NVIDIA GPU with TensorRT"
            log(f"target {profile.name} ({profile.device}) is not this machine ({where}): "
                f"wrote {info['build_plan']} to run on the device")
        return info

    return hook


def _finite_checks(checks: dict) -> dict:
    """Engine-vs-ONNX Runtime errors as the strict-JSON manifest holds them: an engine whose
    outputs hold NaN has a NaN error, recorded as null (and the check as failed)."""
    from fastsam2.runtime.outputs import finite_or_none

    for r in checks.values():
        for o in r["outputs"].values():
            err = finite_or_none(o["max_abs_err"])
            if err is None:
                r["passed"] = False
            o["max_abs_err"], o["tol"] = err, finite_or_none(o["tol"])
    return checks


def echo_random_warnings(caught) -> None:
    """One `warning:` line per distinct random-weights warning caught while building models."""
    shown = set()
    for w in caught:
        text = str(w.message).splitlines()[0]
        if "random" in text and text not in shown:
            shown.add(text)
            click.echo(f"warning: {text}", err=True)


def export_bundle(config="sam2.1_hiera_t", checkpoint=None, target="cpu", keep=0.5, prompts="",
                  prompts_file=None, text_model="ViT-B-32", text_pretrained="laion2b_s34b_b79k",
                  text_checkpoint=None, image_size=1024, opset=17, out="bundle", force=False,
                  seed=0, router_weights=None, precision="auto", calibration=None, log=print) -> dict:
    """The library function behind the command (tests call it directly)."""
    from fastsam2.export.onnx_export import prepare_out_dir
    from fastsam2.profiles import load_profile

    from fastsam2.runtime.track import parse_keep

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
    out = Path(out)
    prepare_out_dir(out, force)  # fail before minutes of work, not after

    from fastsam2.export.model import PrunedSAM2
    from fastsam2.export.onnx_export import write_bundle
    from fastsam2.export.sam2_loader import load_sam2

    loaded = load_sam2(config, checkpoint, image_size=image_size, seed=seed)
    spec = TextEncoderSpec(model=text_model, pretrained=text_pretrained, checkpoint=text_checkpoint,
                           seed=seed)
    emb, text_info = compute_text_embeddings(prompt_list, spec)
    router = None
    if router_weights:
        from fastsam2.calibration.router_training import load_router

        router = load_router(router_weights, text_info["dim"])
    pruned = PrunedSAM2(loaded, router=router, text_dim=text_info["dim"])
    return write_bundle(pruned, out, keep=keep, target=target, opset=opset, text_embeddings=emb,
                        text_info=text_info, force=force, profile=profile,
                        engines_hook=_engines_hook(profile, keep, log), precision_plan=plan,
                        calibration_frames=calibration, log=log)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", default="sam2.1_hiera_t", show_default=True, help="SAM2 config name (sam2.1_hiera_t/s/b+/l, sam2_hiera_*).")
@click.option("--checkpoint", type=str, default=None, help="Official SAM2 checkpoint (.pt). Omit for a seeded random init (tests/offline demo; masks are not meaningful).")
@click.option("--target", default=None, help="Target profile from profiles/ (see --list-targets).")
@click.option("--keep", default="0.5", show_default=True, help="Default keep ratio in (0, 1] (fraction of tokens entering memory attention; centre of the TensorRT profiles), or 'auto'.")
@click.option("--prompts", default="", help='Comma-separated text prompts to precompute, e.g. "cyclist,red soccer ball".')
@click.option("--prompts-file", type=str, default=None, help="File with one prompt per line (# comments allowed).")
@click.option("--text-model", default="ViT-B-32", show_default=True, help="open_clip model name.")
@click.option("--text-pretrained", default="laion2b_s34b_b79k", show_default=True, help="open_clip pretrained tag, or 'random' for a seeded random init (offline tests).")
@click.option("--text-checkpoint", type=str, default=None, help="Local open_clip checkpoint file (instead of downloading the tag).")
@click.option("--image-size", type=int, default=1024, show_default=True, help="Model input size (SAM2 uses 1024; any multiple of 16).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (<= 17 for TensorRT 8.6 / JetPack 6.0).")
@click.option("--out", type=str, default=None, help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inits (SAM2 without --checkpoint, CLIP with 'random', the router).")
@click.option("--router-weights", type=str, default=None, help="Trained router (fastsam2-calibrate router); without it the text term is untrained and the manifest says so.")
@click.option("--precision", default="auto", show_default=True,
              help="CPU precision per graph: auto (the target's cpu_precisions: the fastest that passes the "
                   "agreement gate on this machine), fp32, int8, bf16, or graph=precision,...")
@click.option("--calibration", default=None,
              help="int8 calibration frames: a video, a frames folder, or engines/<target>/ from "
                   "fastsam2-calibrate int8 (default: a generated video).")
@click.option("--list-targets", is_flag=True, help="List the target profiles and exit.")
def main(config, checkpoint, target, keep, prompts, prompts_file, text_model, text_pretrained,
         text_checkpoint, image_size, opset, out, force, seed, router_weights, precision, calibration,
         list_targets):
    """Export the pruned SAM2 as a bundle for fastsam2-run."""
    from fastsam2.profiles import list_targets as _targets, load_profile

    try:
        if list_targets:
            for name in _targets():
                p = load_profile(name)
                click.echo(f"{name:18s} {p.precision:5s} {p.description}")
            return
        if not target:
            raise InputError("--target is required (see --list-targets)")
        if not out or not out.strip():
            raise InputError("--out is required")
        require_export_extra("fastsam2-export")
        # open_clip logs "No pretrained weights loaded" on the root logger for random inits;
        # the one warning line below says it in our words
        logging.getLogger().setLevel(logging.ERROR)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manifest = export_bundle(config, checkpoint, target, keep, prompts, prompts_file, text_model,
                                     text_pretrained, text_checkpoint, image_size, opset, out, force, seed,
                                     router_weights, precision=precision, calibration=calibration,
                                     log=lambda m: click.echo(m, err=True))
        echo_random_warnings(caught)
        sizes = sum(g["bytes"] for g in manifest["graphs"].values()) / 1e6
        reduced = {g: p for g, p in (manifest.get("precision") or {}).items() if p != "fp32"}
        click.echo(f"wrote bundle {out} ({sizes:.1f} MB of ONNX, {manifest['export_seconds']:.1f} s, "
                   f"target {target}, keep {keep}"
                   + (", " + ", ".join(f"{g} {p}" for g, p in reduced.items()) if reduced else "") + ")")
    except FastSam2Error as e:
        click.echo(f"error: {one_line(e)}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
