"""The engines step of an export: TensorRT engines built and checked where the target's GPU is
this machine's, the build plan (build_plan.sh, run on the device) otherwise. write_bundle calls it
inside the temporary bundle, before the bundle is sealed."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def engines_step(profile, keep):
    """export's engines step for `profile`, as write_bundle's engines_hook(tmp, manifest) -> the
    manifest's `engines`: build engines when the target's GPU is this machine's; otherwise write
    the build plan."""

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
            built = build_engines(tmp, profile, shapes)
            built["checks"] = _finite_checks(check_engines(tmp, built, shapes, profile.precision))
            bad = [g for g, r in built["checks"].items() if not r["passed"]]
            for g in bad:
                # a null error is a non-finite one: the worst there is
                worst = max(built["checks"][g]["outputs"].items(),
                            key=lambda kv: float("inf") if kv[1]["max_abs_err"] is None or not kv[1]["tol"]
                            else kv[1]["max_abs_err"] / kv[1]["tol"])
                err, tol = worst[1]["max_abs_err"], worst[1]["tol"]
                log.warning(f"warning: {g} engine differs from ONNX Runtime beyond tolerance ({worst[0]}: max abs "
                            f"error {'non-finite' if err is None else format(err, '.3g')} > "
                            f"{'?' if tol is None else format(tol, '.3g')})")
            log.info(f"engine checks vs ONNX Runtime: {len(built['checks']) - len(bad)}/{len(built['checks'])} "
                     "within tolerance")
            prefix = f"engines/{profile.name}/"
            built["graphs"] = {g: {**v, "file": prefix + Path(v["file"]).name} for g, v in built["graphs"].items()}
            info.update(built, built=True)
            log.info(f"built {len(built['graphs'])} TensorRT engines for {gpu['gpu_name']}")
        else:
            where = f"a {gpu['gpu_name']}" if gpu else "no NVIDIA GPU with TensorRT"
            log.info(f"target {profile.name} ({profile.device}) is not this machine ({where}): "
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
