"""The test model: SAM2.1 hiera-t of the real architecture, seeded random init, adjusted so that
every path of the tracking loop moves the logits by far more than the parity tolerance.

A plain seeded init leaves 57 tensors exactly zero (Hiera's pos_embed / pos_embed_window, every
LayerNorm bias, several conv biases), so the position-embedding interpolation and the biases are
never checked, and it initialises SAM2's learned embeddings (memory temporal encodings,
no_mem_embed, no_obj_ptr, no_obj_embed_spatial) with std 0.02, so reversing or dropping the
temporal encodings moved the logits by only ~5e-5. Here:
- every exactly-zero floating tensor gets N(0, ZERO_NOISE) noise;
- the learned embeddings that carry time and presence get std ~EMBED_SCALE * 0.02;
- the object pointers' temporal projection is scaled by PTR_TPOS_SCALE: at its init scale an
  off-by-one in the pointers' frame distances moved the logits by 2e-6 (below the parity
  tolerance); x10 gave 1.1e-4, x30 4.4e-4 (measured on the session scenario, 256 px).
The loader is used by the tests and by the mutation check (tests/runtime/test_mutations.py), and the
same weights are exported through --checkpoint, so the bundle's graphs are these weights too.
"""

from __future__ import annotations

import warnings

ZERO_NOISE = 0.02
EMBED_SCALE = 10.0
EMBEDDINGS = ("maskmem_tpos_enc", "no_mem_embed", "no_obj_ptr", "no_obj_embed_spatial")
PTR_TPOS_SCALE = 30.0


def exercise_all_paths(model, seed: int = 1234) -> dict:
    """Adjust `model` in place (see module doc); returns what was changed, for messages."""
    import torch

    g = torch.Generator().manual_seed(seed)
    zero = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point and p.numel() and float(p.abs().max()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=g) * ZERO_NOISE)
                zero.append(name)
        for name in EMBEDDINGS:
            getattr(model, name).mul_(EMBED_SCALE)
        for p in model.obj_ptr_tpos_proj.parameters():
            p.mul_(PTR_TPOS_SCALE)
    return {"zero_tensors_filled": zero, "embeddings_scaled": list(EMBEDDINGS) + ["obj_ptr_tpos_proj"]}


def load_test_model(image_size: int = 256, seed: int = 0):
    """LoadedSAM2 of the test model (SAM2VideoPredictor, eval, CPU)."""
    from fastsam2.export.sam2_loader import load_sam2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_sam2("sam2.1_hiera_t", None, image_size=image_size, seed=seed, warn=False)
    exercise_all_paths(loaded.model, seed=1234 + seed)
    return loaded


def save_checkpoint(loaded, path) -> str:
    """The test model's weights as an official-style checkpoint ({"model": state_dict})."""
    import torch

    torch.save({"model": loaded.model.state_dict()}, str(path))
    return str(path)
