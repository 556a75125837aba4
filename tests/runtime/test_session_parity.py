"""The streaming session against SAM2VideoPredictor driven in streaming order (keep 1.0):
prompts on later frames, corrections of tracked frames, objects that start late, the bounded
conditioning memory. Through the PyTorch modules (the exported graphs' source) and through ONNX
Runtime on the bundle, logits compared per frame."""

from __future__ import annotations

import numpy as np
import pytest

from official_stream import compare, correction_steps, first_click, frame_paths, inside, official, ours
from conftest import run_official

# measured on the test model, 256 px, 10 frames, max-abs logits vs SAM2 over every scenario
# here: PyTorch modules 1.56e-6, ONNX Runtime 1.64e-6; the bound is ~6x that. The bugs of
# tests/test_mutations.py move the logits by far more.
TORCH_ATOL = 1e-5
ORT_ATOL = 1e-5
MIN_IOU = 0.999


@pytest.fixture(scope="module")
def video(stream_video):
    return stream_video


def torch_session(pruned, **kw):
    from fastsam2.export.torch_backend import torch_sessions
    from fastsam2.runtime.session import Session

    return Session(torch_sessions(pruned), pruned.constants(), pruned.settings,
                   num_frames=kw.pop("num_frames", 10), **kw)


def ort_session(bundle_dir, **kw):
    from fastsam2.runtime.session import Session

    return Session.open(bundle_dir, keep=1.0, backend="ort-cpu", num_frames=10, warn=lambda m: None, **kw)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_parity_prompt_at_later_frame(pruned, bundle_dir, video, official_correction, backend):
    """(a) click at 0, propagate to t-1, add_new_points_or_box at t, propagate from t."""
    steps, ref = official_correction
    s = torch_session(pruned) if backend == "torch" else ort_session(bundle_dir)
    got = ours(s, video.frames_dir_or_file, steps)
    worst, iou = compare(ref, got)
    print(f"prompt at frame 5 ({backend}): max-abs {worst:.2e}, min IoU {iou:.5f}")
    assert worst <= (TORCH_ATOL if backend == "torch" else ORT_ATOL) and iou >= MIN_IOU
    # the prompt changed tracking: the same run without it differs from frame 5 on
    plain = ours(torch_session(pruned), video.frames_dir_or_file, steps[:1])
    assert compare(ref, plain, frames=range(5))[0] <= TORCH_ATOL
    assert all(compare(ref, plain, frames=[f])[0] > 100 * TORCH_ATOL for f in range(5, 10))


def test_parity_object_that_starts_late(tiny_sam2, pruned, video, tmp_path):
    """(b) object 2 first prompted (a box) at frame 4 equals SAM2 run on frames 4.. alone; object
    1 is unaffected by it."""
    import shutil

    ys, xs = np.nonzero(video.read_mask(4) == 2)
    box4 = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    steps = [first_click(video), ("box", 4, 2, box4)]
    got = ours(torch_session(pruned), video.frames_dir_or_file, steps)
    alone = tmp_path / "from4"
    alone.mkdir()
    for i, p in enumerate(frame_paths(video.frames_dir_or_file)[4:]):
        shutil.copy(p, alone / f"{i:05d}.jpg")
    ref2 = official(tiny_sam2.model, alone, [("box", 0, 2, box4)])
    ref1 = {f: {1: v} for f, v in run_official(tiny_sam2.model, video.frames_dir_or_file,
                                               video.first_frame_points[1]).items()}
    assert all(set(got[f]) == ({1} if f < 4 else {1, 2}) for f in got)
    w1, i1 = compare(ref1, {f: {1: got[f][1]} for f in got})
    w2, i2 = compare({f + 4: v for f, v in ref2.items()}, {f: {2: got[f][2]} for f in range(4, 10)})
    print(f"late object: object 1 max-abs {w1:.2e}, object 2 {w2:.2e}; IoU {i1:.5f} {i2:.5f}")
    assert max(w1, w2) <= TORCH_ATOL and min(i1, i2) >= MIN_IOU
    # the two objects stay apart: a bug that swapped or mixed their banks could not pass
    # (measured: 0.23 at frame 4 shrinking to 2.0e-3 at frame 9 -- the random-init decoder's
    # logits are small, |max| ~0.3 -- against parity errors of ~1.6e-6)
    apart = min(float(np.abs(got[f][1] - got[f][2]).max()) for f in range(4, 10))
    assert apart > 100 * TORCH_ATOL, apart


@pytest.mark.parametrize("as_cond", [False, True])
@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_parity_correction_of_a_tracked_frame(tiny_sam2, pruned, bundle_dir, video, as_cond, backend):
    """A click on the frame just tracked (SAM2: add_new_points_or_box on a tracked frame, fed its
    current logits): the corrected frame, and tracking after it, with SAM2's
    add_all_frames_to_correct_as_cond off (the released configs) and on."""
    steps = [first_click(video), ("correct", 5, 1, [inside(video, 5, 1, 0.3)], [1])]
    ref = official(tiny_sam2.model, video.frames_dir_or_file, steps, correct_as_cond=as_cond)
    s = (torch_session(pruned, correct_as_cond=as_cond) if backend == "torch"
         else ort_session(bundle_dir, correct_as_cond=as_cond))
    record = []
    got = ours(s, video.frames_dir_or_file, steps, record=record)
    worst, iou = compare(ref, got)
    print(f"correction of frame 5 (as_cond={as_cond}, {backend}): max-abs {worst:.2e}, min IoU {iou:.5f}")
    assert worst <= (TORCH_ATOL if backend == "torch" else ORT_ATOL) and iou >= MIN_IOU
    assert record[5].objects[1].prompted and not record[4].objects[1].prompted


def test_parity_prompting_a_conditioning_frame_again(tiny_sam2, pruned, video):
    """New clicks on a frame that was prompted (before tracking goes on) are decoded with the
    frame's current logits, as SAM2 does for a second add_new_points_or_box on that frame."""
    second = ("click", 0, 1, [inside(video, 0, 1, 0.9)], [1])
    ref = official(tiny_sam2.model, video.frames_dir_or_file, [first_click(video), second])
    s = torch_session(pruned)
    got = ours(s, video.frames_dir_or_file, [first_click(video), ("correct",) + second[1:]])
    worst, iou = compare(ref, got)
    print(f"prompted frame prompted again: max-abs {worst:.2e}, min IoU {iou:.5f}")
    assert worst <= TORCH_ATOL and iou >= MIN_IOU


def test_parity_bounded_conditioning_frames(tiny_sam2, pruned, video):
    """More prompts than max_cond_frames: SAM2 with max_cond_frames_in_attn attends to the
    closest ones and keeps the others as past frames' memory; so does the bank."""
    steps = [first_click(video)] + [("click", f, 1, [inside(video, f, 1, 0.2 + 0.2 * i)], [1])
                                    for i, f in enumerate((2, 3, 6))]
    ref = official(tiny_sam2.model, video.frames_dir_or_file, steps, max_cond=2)
    s = torch_session(pruned, max_cond_frames=2)
    got = ours(s, video.frames_dir_or_file, steps)
    worst, iou = compare(ref, got)
    print(f"4 prompts, 2 conditioning frames attended: max-abs {worst:.2e}, min IoU {iou:.5f}")
    assert worst <= TORCH_ATOL and iou >= MIN_IOU
    # and it matters: attending to all four is another result
    unbounded = official(tiny_sam2.model, video.frames_dir_or_file, steps)
    assert compare(unbounded, got, frames=range(7, 10))[0] > 100 * TORCH_ATOL
