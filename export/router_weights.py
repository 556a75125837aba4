"""The router weights file `fastsam2-calibrate router` writes and `fastsam2-export
--router-weights` reads: {"state_dict", "meta"} through torch.save, plain containers only so
that weights_only loads read it. In export, not calibration: export reads it, and calibration
(which trains the router) sits above export."""

from __future__ import annotations

from pathlib import Path

import torch

from fastsam2.runtime.errors import CheckpointError, OutputError

from .graphs.router import Router


def save_router(router: Router, path, meta: dict) -> Path:
    """torch.save {"state_dict", "meta"}; plain containers only, so weights_only loads read it."""
    path = Path(path)
    meta = {**meta, "text_dim": int(router.text_dim), "prior_margin": int(router.prior_margin),
            "feat_dim": int(router.proj_v.in_features), "proj_dim": int(router.proj_v.out_features)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"state_dict": router.state_dict(), "meta": meta}, tmp)
        tmp.replace(path)  # a half-written router file would load as garbage later
    except OSError as e:
        raise OutputError(f"cannot write router weights {path}: {e.strerror or e}") from None
    return path


def load_router(path, text_dim: int) -> Router:
    """A Router from `save_router` output; CheckpointError (one line) when it does not fit."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"router weights not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, truncation: all reported the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read router weights {path}: {first[:200]}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a fastsam2 router file (no state_dict)")
    sd, meta = blob["state_dict"], blob.get("meta") or {}
    need = ("proj_v.weight", "proj_t.weight", "unc_head.weight", "weights", "trained")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"{path} is not a fastsam2 router file (missing {missing[0]})")
    got = int(sd["proj_t.weight"].shape[1])
    if got != int(text_dim):
        raise CheckpointError(f"router {path} was trained for {got}-dim text embeddings "
                              f"({meta.get('text_model', 'unknown text model')}); this export uses "
                              f"{text_dim}: train it again with the same --text-model")
    feat_dim, proj_dim = int(sd["proj_v.weight"].shape[1]), int(sd["proj_v.weight"].shape[0])
    router = Router(feat_dim=feat_dim, text_dim=got, proj_dim=proj_dim,
                    prior_margin=int(meta.get("prior_margin", 2)))
    try:
        router.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"router {path} does not fit: {str(e).splitlines()[0][:200]}") from None
    return router.eval()
