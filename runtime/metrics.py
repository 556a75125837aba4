"""Mask agreement, one definition for the whole project: the DAVIS benchmark's Jaccard index.

Used by DAVIS J&F (calibration/davis.py), the precision gate, the benchmarks and the tests.
"""

from __future__ import annotations

import numpy as np


def mask_iou(a, b, void=None):
    """Jaccard index of two boolean masks (..., H, W); pixels marked `void` count for neither
    set; two empty masks agree perfectly (1.0), as in the DAVIS benchmark. A float for one pair
    of masks, an array over the leading axes otherwise."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"masks {a.shape} and {b.shape} differ in shape")
    keep = True if void is None else ~np.asarray(void).astype(bool)
    inter = np.sum(a & b & keep, axis=(-2, -1))
    union = np.sum((a | b) & keep, axis=(-2, -1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j
