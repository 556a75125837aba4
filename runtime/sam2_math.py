"""Pure numpy steps of the SAM2 video loop, each reproducing a line of the official code.

Kept small and side-effect free so tests can hold each against the PyTorch reference.
"""

from __future__ import annotations

import numpy as np

NO_OBJ_SCORE = -1024.0  # sam2_base.NO_OBJ_SCORE: logits of a frame where the object is absent
# the router adds a bonus of 1e3 to tokens in/near the previous mask (export/graphs/router.py);
# its other terms are standardised, so any score above half the bonus is a prior token
PRIOR_SCORE = 500.0


def preprocess(rgb: np.ndarray, image_size: int, mean, std) -> np.ndarray:
    """uint8 HxWx3 -> float32 [1,3,S,S], as sam2.utils.misc._load_img_as_tensor + normalise.

    PIL's resize (its default filter) on purpose: SAM2 resizes JPEG frames with PIL, and any
    other resampler moves the logits by more than the parity tolerance.
    """
    from PIL import Image

    img = np.asarray(Image.fromarray(rgb).resize((image_size, image_size)))
    x = (img / 255.0).astype(np.float32).transpose(2, 0, 1)
    x -= np.asarray(mean, np.float32)[:, None, None]
    x /= np.asarray(std, np.float32)[:, None, None]
    return x[None]


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even like torch.

    SAM2's video predictor stores memory features as bfloat16 (`maskmem_features.to(
    torch.bfloat16)`); the memory bank does the same, which both matches SAM2 and halves it.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def from_bf16_bits(b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact)."""
    wide = b.astype(np.uint32) << 16
    if out is None:
        return wide.view(np.float32)
    out[...] = wide.view(np.float32)
    return out


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Rows of torch's bilinear interpolation (align_corners=False, no antialias)."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), (1 - w1).astype(np.float32))
    np.add.at(m, (np.arange(out_size), i1), w1.astype(np.float32))
    return m


def _antialias_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Rows of torch's bilinear interpolation with antialias=True (a triangle filter widened
    by the downscale factor, as PIL does), align_corners=False."""
    scale = in_size / out_size
    support = scale if scale > 1.0 else 1.0
    inv = 1.0 / scale if scale > 1.0 else 1.0
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * inv))
        total = w.sum()
        m[i, lo:hi] = (w / total if total > 0 else w).astype(np.float32)
    return m


class Resizer:
    """Bilinear resize of [h, w] maps to (H, W), as F.interpolate(..., 'bilinear',
    align_corners=False); the interpolation matrices are built once per size pair."""

    def __init__(self, antialias: bool = False):
        self._cache = {}
        self._matrix = _antialias_matrix if antialias else _bilinear_matrix

    def __call__(self, x: np.ndarray, size: tuple) -> np.ndarray:
        h, w = x.shape[-2:]
        key = (h, w) + tuple(size)
        if key not in self._cache:
            self._cache[key] = (self._matrix(size[0], h), self._matrix(size[1], w).T.copy())
        my, mxt = self._cache[key]
        return my @ x.astype(np.float32) @ mxt


def sine_pe_1d(pos: np.ndarray, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """sam2_utils.get_1d_sine_pe in float32: [n] -> [n, dim]."""
    pe_dim = dim // 2
    dim_t = np.arange(pe_dim, dtype=np.float32)
    dim_t = np.float32(temperature) ** (np.float32(2) * (dim_t // 2) / np.float32(pe_dim))
    emb = pos.astype(np.float32)[:, None] / dim_t
    return np.concatenate([np.sin(emb), np.cos(emb)], axis=-1).astype(np.float32)


def use_multimask(settings: dict, is_init_cond_frame: bool, num_points: int) -> bool:
    """SAM2Base._use_multimask."""
    return bool(
        settings["multimask_output_in_sam"]
        and (is_init_cond_frame or settings["multimask_output_for_tracking"])
        and settings["multimask_min_pt_num"] <= num_points <= settings["multimask_max_pt_num"]
    )


def select_mask(settings: dict, masks, iou, obj_ptrs, object_score, multimask: bool,
                no_obj_ptr: np.ndarray):
    """From the decoder's 4 tokens to SAM2's output: (low_res [1,1,h,w], iou, obj_ptr [1,C]).

    Reproduces MaskDecoder.forward's token choice (incl. the dynamic stability fallback) and
    SAM2Base._forward_sam_heads' best-IoU pick and no-object handling.
    """
    if multimask:
        best = int(np.argmax(iou[0, 1:])) + 1
        low, score = masks[:, best:best + 1], iou[:, best:best + 1]
        tok = best if settings["use_multimask_token_for_obj_ptr"] else 0
    else:
        low, score, tok = masks[:, 0:1], iou[:, 0:1], 0
        if settings["dynamic_multimask_via_stability"]:
            delta = settings["dynamic_multimask_stability_delta"]
            m0 = masks[0, 0]
            area_i = float(np.sum(m0 > delta))
            area_u = float(np.sum(m0 > -delta))
            stability = area_i / area_u if area_u > 0 else 1.0
            if stability < settings["dynamic_multimask_stability_thresh"]:
                best = int(np.argmax(iou[0, 1:])) + 1
                low, score = masks[:, best:best + 1], iou[:, best:best + 1]
    ptr = obj_ptrs[:, tok]
    low = np.array(low, dtype=np.float32)
    if settings["pred_obj_scores"]:
        present = float(object_score.reshape(-1)[0] > 0)
        if not present:
            low[...] = NO_OBJ_SCORE
        lam = 1.0 / (1.0 + np.exp(-float(object_score.reshape(-1)[0]))) if settings["soft_no_obj_ptr"] else present
        if settings["fixed_no_obj_ptr"]:
            ptr = lam * ptr
        ptr = ptr + (1 - lam) * no_obj_ptr[None]
    return low, score, ptr.astype(np.float32)


def top_k_tokens(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, ascending (so keep 1.0 is exactly arange(T)). Equal
    scores at the k-th place go to the lower index: a stable sort, the same on every numpy and
    machine. (argpartition leaves ties to its algorithm, which numpy 2 changed: a server on
    numpy 1.x kept other tokens than a local run on 2.x at 1024 px, where the prior's bonus
    makes ties, and the masks drifted apart from there; tests/serve/test_serve_1024.py.)"""
    s = scores.reshape(-1)
    if k >= s.size:
        return np.arange(s.size, dtype=np.int64)
    idx = np.argsort(-s, kind="stable")[:k]
    return np.sort(idx).astype(np.int64)


def scatter_tokens(fill: np.ndarray, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[T, C] grid = fill with the rows at idx replaced by values (pruned rows keep fill)."""
    out = np.array(fill, dtype=np.float32, copy=True)
    out[idx] = values
    return out


def mask_area_bbox(binary: np.ndarray):
    """(area, [x0, y0, x1, y1] or None) of a boolean HxW mask."""
    area = int(binary.sum())
    if area == 0:
        return 0, None
    ys = np.flatnonzero(binary.any(axis=1))
    xs = np.flatnonzero(binary.any(axis=0))
    return area, [int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])]


def compose_objects(logits: np.ndarray, ids) -> np.ndarray:
    """[O, H, W] per-object logits -> one palette-index mask: a pixel goes to the object with
    the highest logit where that logit is positive, else background 0 (SAM2 keeps per-object
    masks, which may overlap; a DAVIS-style PNG holds one id per pixel)."""
    ids = np.asarray(ids, np.uint8)
    if len(ids) == 1:
        return np.where(logits[0] > 0, ids[0], 0).astype(np.uint8)
    return np.where(logits.max(axis=0) > 0, ids[np.argmax(logits, axis=0)], 0).astype(np.uint8)
