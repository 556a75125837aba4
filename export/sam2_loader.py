"""Load SAM2 as users have it: official config names and official checkpoint files.

No checkpoint can be downloaded on our machines, so "no checkpoint" means a seeded random init
of the same architecture. That path is what tests use; it warns once that masks are not
meaningful, and the manifest records it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

from fastsam2.runtime.bundle import sha256_file
from fastsam2.runtime.cli_edge import ANSI, NOT_UNPICKLED
from fastsam2.runtime.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

# user-facing name -> hydra config path inside the sam2 package
CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_t": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_s": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_b+": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_l": "configs/sam2/sam2_hiera_l.yaml",
}
# the official checkpoint file names, for messages and docs
CHECKPOINT_FILES = {
    "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
    "sam2_hiera_t": "sam2_hiera_tiny.pt",
    "sam2_hiera_s": "sam2_hiera_small.pt",
    "sam2_hiera_b+": "sam2_hiera_base_plus.pt",
    "sam2_hiera_l": "sam2_hiera_large.pt",
}

RANDOM_WEIGHTS_WARNING = (
    "no SAM2 checkpoint given: using a seeded random init of {config}; "
    "masks are NOT meaningful (pass --checkpoint {ckpt} for real results)"
)


@dataclass
class LoadedSAM2:
    model: object  # sam2.sam2_video_predictor.SAM2VideoPredictor, eval mode, CPU
    config: str
    image_size: int
    checkpoint: str | None
    checkpoint_sha256: str | None  # None for random init
    seed: int | None


def torch_load_reason(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, without torch's advice to turn
    weights_only off (which would run the file's code): for the checkpoint and router loaders."""
    text = ANSI.sub("", str(exc))
    if "Weights only load failed" in text:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
        return f"{NOT_UNPICKLED}: {' '.join(m.group(1).split())}" if m else NOT_UNPICKLED
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def config_path(name: str) -> str:
    """The hydra config path for a user-facing config name (or a path already in that form)."""
    if name in CONFIGS:
        return CONFIGS[name]
    if name in CONFIGS.values():
        return name
    stem = os.path.splitext(os.path.basename(name))[0]
    if stem in CONFIGS:
        return CONFIGS[stem]
    raise InputError(f"unknown SAM2 config '{name}'; known: {', '.join(CONFIGS)}")


def _read_state_dict(path: str):
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors differ by torch version
        raise CheckpointError(f"cannot read checkpoint {path}: {torch_load_reason(e)}") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # the official files hold {"model": state_dict}
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"checkpoint {path} holds no state dict")
    return sd


def check_state_dict(model, sd: dict, path: str) -> None:
    """Raise CheckpointError naming the first key that does not match the config."""
    own = model.state_dict()
    for k in own:
        if k not in sd:
            raise CheckpointError(f"checkpoint {path} does not match the config: missing key '{k}'")
        if tuple(sd[k].shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"checkpoint {path} does not match the config: key '{k}' has shape "
                f"{tuple(sd[k].shape)}, the config expects {tuple(own[k].shape)}"
            )
    for k in sd:
        if k not in own:
            raise CheckpointError(f"checkpoint {path} does not match the config: unexpected key '{k}'")


def check_sam2_args(config: str, image_size: int) -> str:
    """The user-facing config name, once the config and the input size are known to be valid:
    export checks them before minutes of work (and before the random-weights warning)."""
    cfg_path = config_path(config)
    if image_size % 16 or image_size < 128:
        raise InputError(f"--image-size must be a multiple of 16 and >= 128, got {image_size}")
    return next((k for k, v in CONFIGS.items() if v == cfg_path), config)


def random_weights_warning(config: str) -> str:
    """The warning for a SAM2 built without a checkpoint (config: a user-facing name)."""
    return RANDOM_WEIGHTS_WARNING.format(config=config, ckpt=CHECKPOINT_FILES.get(config, "FILE.pt"))


def load_sam2(config: str = "sam2.1_hiera_t", checkpoint: str | None = None,
              image_size: int = 1024, seed: int = 0, warn: bool = True) -> LoadedSAM2:
    """Build `SAM2VideoPredictor` exactly as `sam2.build_sam.build_sam2_video_predictor` does
    (same post-processing overrides), at `image_size`, on the CPU, in eval mode."""
    import torch
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    name = check_sam2_args(config, image_size)
    cfg_path = config_path(name)
    sd = _read_state_dict(checkpoint) if checkpoint else None

    overrides = [
        "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
        f"++model.image_size={image_size}",
        # the same post-processing overrides build_sam2_video_predictor applies by default
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        "++model.fill_hole_area=8",
    ]
    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    cfg = compose(config_name=cfg_path, overrides=overrides)
    OmegaConf.resolve(cfg)
    torch.manual_seed(seed)
    model = instantiate(cfg.model, _recursive_=True)
    if sd is not None:
        check_state_dict(model, sd, checkpoint)
        model.load_state_dict(sd, strict=True)
        digest = sha256_file(checkpoint)
    else:
        digest = None
        if warn:
            warnings.warn(random_weights_warning(name), stacklevel=2)
    model = model.to("cpu").eval()
    return LoadedSAM2(model=model, config=name, image_size=image_size, checkpoint=checkpoint,
                      checkpoint_sha256=digest, seed=None if sd is not None else seed)


def model_settings(model) -> dict:
    """The SAM2 settings the runtime loop needs, recorded in the bundle manifest."""
    dec = model.sam_mask_decoder
    return {
        "image_size": int(model.image_size),
        "num_maskmem": int(model.num_maskmem),
        "max_obj_ptrs_in_encoder": int(model.max_obj_ptrs_in_encoder),
        "hidden_dim": int(model.hidden_dim),
        "mem_dim": int(model.mem_dim),
        "directly_add_no_mem_embed": bool(model.directly_add_no_mem_embed),
        "use_obj_ptrs_in_encoder": bool(model.use_obj_ptrs_in_encoder),
        "add_tpos_enc_to_obj_ptrs": bool(model.add_tpos_enc_to_obj_ptrs),
        "proj_tpos_enc_in_obj_ptrs": bool(model.proj_tpos_enc_in_obj_ptrs),
        "use_signed_tpos_enc_to_obj_ptrs": bool(model.use_signed_tpos_enc_to_obj_ptrs),
        "only_obj_ptrs_in_the_past_for_eval": bool(model.only_obj_ptrs_in_the_past_for_eval),
        "pred_obj_scores": bool(model.pred_obj_scores),
        "fixed_no_obj_ptr": bool(model.fixed_no_obj_ptr),
        "soft_no_obj_ptr": bool(model.soft_no_obj_ptr),
        "multimask_output_in_sam": bool(model.multimask_output_in_sam),
        "multimask_output_for_tracking": bool(model.multimask_output_for_tracking),
        "multimask_min_pt_num": int(model.multimask_min_pt_num),
        "multimask_max_pt_num": int(model.multimask_max_pt_num),
        "use_multimask_token_for_obj_ptr": bool(model.use_multimask_token_for_obj_ptr),
        "dynamic_multimask_via_stability": bool(dec.dynamic_multimask_via_stability),
        "dynamic_multimask_stability_delta": float(dec.dynamic_multimask_stability_delta),
        "dynamic_multimask_stability_thresh": float(dec.dynamic_multimask_stability_thresh),
        "binarize_mask_from_pts_for_mem_enc": bool(model.binarize_mask_from_pts_for_mem_enc),
        "memory_temporal_stride_for_eval": int(model.memory_temporal_stride_for_eval),
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
