"""The spine: at keep 1.0 the pruned tracker is SAM2's video predictor (PyTorch modules,
numpy loop); below 1.0 it really prunes, with a bank of constant size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import NUM_FRAMES, load_tiny, mask_iou, run_official
from fastsam2.runtime.sam2_math import Resizer
from fastsam2.runtime.session import Session


def _frames(frames_dir):
    return sorted(p for p in frames_dir.iterdir() if p.suffix == ".jpg")


class Recording:
    """A session wrapper that records the shapes each graph was fed."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def run(self, feeds):
        self.log.append({k: v.shape for k, v in feeds.items()})
        return self.inner.run(feeds)


def track_frames(pruned, frames_dir, point, keep=1.0, num_frames=None, record=None, fill="no_mem"):
    """The streaming session on the PyTorch graph modules: ({frame: logits at input size},
    [object 1's result per frame], object 1's Tracker for the bank's internals)."""
    from fastsam2.export.torch_backend import torch_sessions

    sessions = torch_sessions(pruned)
    if record is not None:
        sessions["memory_attention"] = Recording(sessions["memory_attention"], record)
    paths = _frames(frames_dir)
    s = Session(sessions, pruned.constants(), pruned.settings, keep=keep, backend="torch",
                num_frames=num_frames or len(paths), fill=fill)
    s.add_prompt(1, points=[tuple(point)])
    rs = Resizer()
    out, results = {}, []
    for i, p in enumerate(paths):
        rgb = np.asarray(Image.open(p).convert("RGB"))
        r = s.push(rgb).objects[1]
        results.append(r)
        out[i] = rs(r.logits, rgb.shape[:2])
    return out, results, s._trackers[1]


# measured on the test model (max-abs logits vs SAM2VideoPredictor): 256 px 1.55e-6, 1024 px
# 5.63e-6 (8 frames); the bounds are ~6-9x those. Mask prompts: 4.9e-6 relative to max |logit|.
ATOL_256, ATOL_1024, RTOL_MASK_PROMPT = 1e-5, 5e-5, 5e-5


def assert_parity(official, ours, atol=ATOL_256, min_iou=0.999):
    assert sorted(official) == sorted(ours)
    worst = max(float(np.abs(official[i] - ours[i]).max()) for i in official)
    ious = [mask_iou(official[i] > 0, ours[i] > 0) for i in official]
    assert worst <= atol, f"max-abs logits difference {worst:.3e}"
    assert min(ious) >= min_iou, f"min IoU {min(ious):.5f}"
    return worst, min(ious)


def test_parity_keep1_matches_official_predictor(pruned, synth, official_logits):
    ours, results, _ = track_frames(pruned, synth.frames_dir_or_file, synth.first_frame_points[1])
    assert len(ours) == NUM_FRAMES >= 9
    # the masks are not trivial: some pixels in, some out, on every frame
    for i, logits in official_logits.items():
        frac = float((logits > 0).mean())
        assert 0.0 < frac < 1.0, (i, frac)
    worst, min_iou = assert_parity(official_logits, ours)
    print(f"parity 256px {NUM_FRAMES} frames: max-abs {worst:.2e}, min IoU {min_iou:.5f}")


def test_parity_check_can_fail(pruned, synth, official_logits):
    """The comparison above is sensitive: pruning half the tokens breaks it."""
    ours, _, _ = track_frames(pruned, synth.frames_dir_or_file, synth.first_frame_points[1], keep=0.5)
    worst = max(float(np.abs(official_logits[i] - ours[i]).max()) for i in ours)
    assert worst > 1e-3


def test_pruned_memory_attention_gets_k_tokens_and_bank_stays_constant(pruned, tmp_path):
    from fastsam2.calibration.synthetic import make_video

    vid = make_video(tmp_path, num_frames=22, size=(120, 160), seed=3, fmt="jpg")
    log = []
    keep = 0.3
    T = pruned.geometry["T"]
    k = max(64, int(np.ceil(keep * T)))
    _, results, tr = track_frames(pruned, vid.frames_dir_or_file, vid.first_frame_points[1],
                                  keep=keep, record=log)
    assert len(results) == 22
    assert all(r.kept_tokens == k for r in results[1:])
    assert len(log) == 21
    for shapes in log:
        assert shapes["curr"] == (k, 256) and shapes["curr_idx"] == (k,)
    # bank: the conditioning frame keeps all T tokens; each tracked frame keeps exactly k
    slots = pruned.settings["num_maskmem"] - 1
    assert tr.bank.cond[0][1].shape[0] == T
    assert tr.bank.stored_tokens() == slots * k
    assert set(tr.bank.count.tolist()) == {k}
    # memory fed to attention: constant once the bank is full (frames >= 7)
    ms = [s["memory_idx"][0] for s in log]
    assert ms[0] == T  # frame 1 sees only the conditioning frame
    full = T + slots * k
    assert all(m == full for m in ms[slots:]), ms
    m_tokens = [s["memory"][0] for s in log]
    assert max(m_tokens) == full + 16 * 4  # plus 16 object pointers of 4 tokens
    assert m_tokens[-1] == m_tokens[-2]


def test_fill_last_option_runs_and_differs(pruned, synth):
    a, _, _ = track_frames(pruned, synth.frames_dir_or_file, synth.first_frame_points[1], keep=0.5)
    b, _, _ = track_frames(pruned, synth.frames_dir_or_file, synth.first_frame_points[1], keep=0.5,
                           fill="last")
    assert np.allclose(a[0], b[0])  # the prompted frame does not use the fill
    assert any(not np.allclose(a[i], b[i]) for i in range(1, len(a)))


@pytest.mark.slow
def test_parity_keep1_at_1024(tmp_path):
    from fastsam2.calibration.synthetic import make_video
    from fastsam2.export.model import PrunedSAM2

    # 8 frames: the memory bank fills (num_maskmem = 7) and the pointers span 7 frames
    vid = make_video(tmp_path, num_frames=8, size=(240, 320), seed=1, fmt="jpg")
    loaded = load_tiny(image_size=1024)
    official = run_official(loaded.model, vid.frames_dir_or_file, vid.first_frame_points[1])
    ours, _, _ = track_frames(PrunedSAM2(loaded), vid.frames_dir_or_file, vid.first_frame_points[1])
    worst, min_iou = assert_parity(official, ours, atol=ATOL_1024)
    print(f"parity 1024px 8 frames: max-abs {worst:.2e}, min IoU {min_iou:.5f}")


def test_parity_mask_prompt_two_objects_matches_add_new_mask(pruned, tiny_sam2, tmp_path):
    """Semi-supervised start (DAVIS): SAM2's add_new_mask for two objects, each tracked on its
    own slice sharing the image encoder, as SAM2VideoPredictor does."""
    from fastsam2.calibration.synthetic import make_video
    from fastsam2.export.torch_backend import torch_sessions

    vid = make_video(tmp_path, num_frames=10, size=(240, 320), seed=2, objects=2, fmt="jpg")
    gt0 = vid.read_mask(0)
    pred = tiny_sam2.model
    with torch_inference():
        state = pred.init_state(str(vid.frames_dir_or_file))
        for oid in (1, 2):
            pred.add_new_mask(state, 0, oid, gt0 == oid)
        official = {fi: m[:, 0].float().numpy().copy() for fi, _, m in pred.propagate_in_video(state)}
    s = Session(torch_sessions(pruned), pruned.constants(), pruned.settings, keep=1.0, backend="torch", num_frames=10)
    for o in (1, 2):
        s.add_prompt(o, mask=gt0 == o)
    rs = Resizer()
    worst, ious = 0.0, []
    for i, p in enumerate(_frames(vid.frames_dir_or_file)):
        rgb = np.asarray(Image.open(p).convert("RGB"))
        res = s.push(rgb)
        for o in (1, 2):
            ours = rs(res.objects[o].logits, rgb.shape[:2])
            ref = official[i][o - 1]
            # frame 0 holds the -10/+10 logits of the mask itself: relative tolerance
            worst = max(worst, float(np.abs(ref - ours).max() / max(1.0, np.abs(ref).max())))
            ious.append(mask_iou(ref > 0, ours > 0))
    print(f"mask prompts, two objects: max relative {worst:.2e}, min IoU {min(ious):.5f}")
    assert worst <= RTOL_MASK_PROMPT and min(ious) >= 0.999, (worst, min(ious))


def torch_inference():
    import torch

    return torch.inference_mode()


def test_keep_auto_budget_stays_in_range(pruned, synth):
    _, results, tr = track_frames(pruned, synth.frames_dir_or_file, synth.first_frame_points[1], keep="auto")
    T = pruned.geometry["T"]
    lo = max(64, int(np.ceil(0.3 * T)))
    assert all(lo <= r.kept_tokens <= T for r in results[1:])
    assert tr.adaptive and tr.budget.last_motion > 0


def test_adaptive_budget_responds_to_mass_and_motion():
    from fastsam2.runtime.tracker import AdaptiveBudget

    T = 256
    b = AdaptiveBudget(T, k_min=32, k_max=256, mass=0.8, gain=2.0)
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((T, 8)).astype(np.float32)
    peaked = np.full(T, -5.0, np.float32)
    peaked[:10] = 5.0  # mass on 10 tokens
    k_peaked = b(peaked, tokens)
    flat = np.zeros(T, np.float32)  # mass spread over all tokens
    b2 = AdaptiveBudget(T, 32, 256)
    k_flat = b2(flat, tokens)
    assert k_peaked == 32 and k_flat > 150
    prior = peaked.copy()
    prior[100:160] = 1000.0  # prior tokens are always counted
    assert AdaptiveBudget(T, 32, 256)(prior, tokens) >= 60
    # same scores, a moving scene: the budget widens
    still = AdaptiveBudget(T, 32, 256)
    still(peaked + 0, tokens)
    k_still = still(np.where(np.arange(T) < 40, 5.0, -5.0).astype(np.float32), tokens)
    moving = AdaptiveBudget(T, 32, 256)
    moving(peaked + 0, tokens)
    k_moving = moving(np.where(np.arange(T) < 40, 5.0, -5.0).astype(np.float32), tokens * 0.2 + 1.0)
    assert k_moving > k_still
