"""Below keep 1.0: our tracker against SAM2VideoPredictor run with the pruned step
(tests/runtime/pruned_reference.py: SAM2's own loop, its memory conditioning rebuilt from its
own parts to attend from and to kept tokens only, the kept tokens chosen by the test: the top-k
of the PyTorch router's scores on SAM2's own features and logits, never our tracker's choice).
Per frame: low-res logits (SAM2's pred_masks) within the bound, our kept set equal to the
reference's top-k and to the top-k of the scores our router returned, every token in/near the
previous mask kept (tests/runtime/router_oracle.py). The keep-1.0 parity tests cannot see bugs
of the pruned path; these can.

The pruned-path bugs that must fail these checks are injected one at a time by
tests/runtime/test_mutations.py (PyTorch graph modules, keep 0.5, the streaming scenarios'
video; measured there: max-abs logits over the frames compared, or the oracle's finding; none
of them moves the keep-1.0 parity, where nothing is pruned):
  top-k keeps the lowest scores                        oracle: 128 of 128 kept tokens wrong
  top-k off by one (highest dropped, (k+1)-th kept)   oracle: 1 token
  router's prior bonus dropped / prior not dilated     oracle: 12 of 36 prior tokens dropped
  query RoPE index gathered at 0..k-1                  1.7e-1 (and the oracle)
  memory RoPE index at 0..n-1 (bank.assemble)          6.5e-4 (frames 0-2)
  pruned positions without no_mem_embed                1.6e-1
  token gather: the first k tokens, not the kept ones  1.8e-1
  vision_pos of the first k tokens / of the neighbour  6.3e-3 / 4.3e-3 (frames 0-2)
  bank storing the first n tokens' features            3.3e-3 (frames 0-2)
  scatter back at the neighbouring kept positions     1.7e-1
The top-k and prior bugs are caught by the oracle on a small previous mask
(tests/runtime/test_router_oracle.py): SAM2's masks on the test model cover most of the frame,
so here the prior spans the whole grid at 256 px and cannot show a lost prior bonus.
"""

from __future__ import annotations

import numpy as np
import pytest

from pruned_reference import compare, pruned_reference_check, run_reference

NUM_FRAMES = 10  # past num_maskmem = 7: the bank's ring wraps
# measured on the test model, 256 px, 10 frames, max-abs low-res logits vs the pruned reference:
# PyTorch graph modules 2.6e-7 (keep 0.5), 2.7e-7 (keep 0.3); bounds ~10x
TORCH_ATOL = 3e-6
# ONNX Runtime on the bundle (fp32 graphs): 5.4e-7 (keep 0.5), 5.4e-7 (keep 0.3); bound ~10x
ORT_ATOL = 5e-6
MIN_IOU = 0.999
# the reference with every token kept is SAM2 unchanged: measured 0.0 (the same float ops)
FULL_ATOL = 1e-6


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from fastsam2.calibration.synthetic import make_video

    return make_video(tmp_path_factory.mktemp("pruned"), num_frames=NUM_FRAMES, size=(240, 320), seed=0,
                      fmt="jpg")


@pytest.fixture(scope="module")
def official_full(tiny_sam2, video):
    """SAM2VideoPredictor unchanged (every token): low-res logits per frame."""
    return run_reference(tiny_sam2, video.frames_dir_or_file, video.first_frame_points[1], None)


def test_reference_keeping_every_token_is_sam2(tiny_sam2, pruned, video, official_full):
    """The reference's memory selection, RoPE by grid index and attention from SAM2's parts
    reproduce SAM2's own _prepare_memory_conditioned_features when nothing is pruned."""
    T = pruned.geometry["T"]
    kept = {f: np.arange(T) for f in range(1, NUM_FRAMES)}
    ref = run_reference(tiny_sam2, video.frames_dir_or_file, video.first_frame_points[1], kept)
    worst, iou = compare(official_full, ref)
    print(f"reference at full keep vs SAM2: max-abs {worst:.2e}, min IoU {iou:.5f}")
    assert worst <= FULL_ATOL and iou == 1.0
    # the masks are not trivial: some pixels in, some out, on every frame
    assert all(0.0 < float((v > 0).mean()) < 1.0 for v in official_full.values())


def _check(pruned, tiny_sam2, video, keep, official_full, atol, **kw):
    d = {}
    worst, iou, violations = pruned_reference_check(pruned, tiny_sam2, video.frames_dir_or_file,
                                                    video.first_frame_points[1], keep, details=d, **kw)
    assert not violations, violations
    T = pruned.geometry["T"]
    k = max(64, int(np.ceil(keep * T)))
    assert all(v.size == k == np.unique(v).size for v in d["kept"].values())
    # pruning changes the result far beyond the tolerance: the comparison is not trivial
    moved = compare(official_full, d["ref"])[0]
    assert moved > 100 * atol, moved
    assert all(0.0 < float((v > 0).mean()) < 1.0 for v in d["ref"].values())
    return worst, iou, moved


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_torch_graphs_match_pruned_reference(pruned, tiny_sam2, video, official_full, keep):
    worst, iou, moved = _check(pruned, tiny_sam2, video, keep, official_full, TORCH_ATOL)
    print(f"PyTorch graphs keep {keep}: max-abs {worst:.2e}, min IoU {iou:.5f} "
          f"(pruning moved the logits by {moved:.2e})")
    assert worst <= TORCH_ATOL and iou >= MIN_IOU


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_onnx_runtime_matches_pruned_reference(pruned, tiny_sam2, video, official_full, bundle_dir, keep):
    from fastsam2.runtime.session import Session

    s = Session.open(bundle_dir, keep=keep, backend="ort-cpu", num_frames=NUM_FRAMES, warn=lambda m: None)
    assert s.backend == "ort-cpu"
    worst, iou, moved = _check(pruned, tiny_sam2, video, keep, official_full, ORT_ATOL, session=s)
    print(f"ONNX Runtime keep {keep}: max-abs {worst:.2e}, min IoU {iou:.5f} "
          f"(pruning moved the logits by {moved:.2e})")
    assert worst <= ORT_ATOL and iou >= MIN_IOU
