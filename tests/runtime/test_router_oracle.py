"""The kept set of a tracked frame against the test's own oracle (tests/runtime/router_oracle.py):
the k highest router scores, and every token in/near the previous mask. The pruned parity
tests (test_pruned_parity.py) hold the same oracle on SAM2's masks, but on the test model
those masks cover most of the frame, so their prior spans the whole grid and cannot tell a
lost prior; here the previous mask is a small mask prompt, so the prior is a small part of it.
"""

from __future__ import annotations

import numpy as np
import pytest

from router_oracle import PRIOR_MARGIN, oracle_top_k, prior_check, prior_tokens, top_k_violation

KEEP = 0.5
FRAMES = 3  # the mask-prompted frame, a tracked frame with the small prior, one more


def small_mask(video) -> np.ndarray:
    """A 30 x 40 px box around the object's click (about 2 x 2 tokens at 256 px)."""
    h, w = 240, 320
    x, y = video.first_frame_points[1]
    m = np.zeros((h, w), bool)
    m[max(0, y - 15):y + 15, max(0, x - 20):x + 20] = True
    return m


@pytest.fixture(scope="module")
def frames(stream_video):
    from official_stream import read_frames

    got = read_frames(stream_video.frames_dir_or_file)[:FRAMES]
    assert got[0].shape[:2] == (240, 320)
    return got


def test_top_k_tokens_keeps_the_highest_scores():
    from fastsam2.runtime.sam2_math import top_k_tokens

    rng = np.random.default_rng(0)
    for T, k in ((256, 128), (256, 77), (4096, 1229), (64, 64), (100, 1)):
        s = rng.standard_normal(T).astype(np.float32)
        got = top_k_tokens(s, k)
        assert np.array_equal(got, np.sort(np.argsort(-s, kind="stable")[:k])), (T, k)
        assert np.all(np.diff(got) > 0) and got.dtype == np.int64
    # ties at the k-th score: any choice inside the tied group is a top-k
    s = rng.integers(0, 5, 256).astype(np.float32)
    got = top_k_tokens(s, 100)
    assert top_k_violation(s, got, 100) is None
    assert oracle_top_k(s, 100)[1]  # the oracle sees the tie
    assert top_k_violation(s, np.sort(np.argsort(s, kind="stable")[:100]), 100) is not None  # the lowest


def test_prior_tokens_are_the_routers_prior(pruned):
    """The oracle's prior (numpy) is the router's own prior term (its max-pool dilation), so the
    oracle checks the router's documented behaviour, not a second definition of it."""
    import torch

    assert pruned.router.prior_margin == PRIOR_MARGIN
    G = pruned.geometry["G"]
    rng = np.random.default_rng(1)
    feat = torch.from_numpy(rng.standard_normal((1, 256, G, G)).astype(np.float32))
    text = torch.zeros(1, int(pruned.settings["text_dim"]))
    for case in range(3):
        logits = np.full((1, 1, 4 * G, 4 * G), -5.0, np.float32)
        if case == 0:  # one positive low-res pixel: a (2 * margin + 1)^2 square of tokens
            logits[0, 0, 4 * 5 + 1, 4 * 7 + 2] = 3.0
            expect = [r * G + c for r in range(3, 8) for c in range(5, 10)]
            assert np.array_equal(prior_tokens(logits, G), expect)
        elif case == 1:  # at the corner: the square clipped
            logits[0, 0, 0, 4 * G - 1] = 3.0
            assert np.array_equal(prior_tokens(logits, G), [r * G + c for r in range(3) for c in range(G - 3, G)])
        else:
            logits = rng.standard_normal(logits.shape).astype(np.float32) * 4 - 6
        with torch.inference_mode():
            prior = pruned.router.terms(feat, text, torch.from_numpy(logits))[3].reshape(-1).numpy()
        assert np.array_equal(np.flatnonzero(prior > 0.5), prior_tokens(logits, G)), case


def test_kept_set_is_top_k_and_keeps_the_prior_pytorch(pruned, frames, stream_video):
    from pruned_reference import torch_session

    s = torch_session(pruned, KEEP, FRAMES)
    violations = prior_check(s, frames, small_mask(stream_video), pruned.router, KEEP)
    assert not violations, violations


def test_kept_set_is_top_k_and_keeps_the_prior_onnx_runtime(pruned, frames, stream_video, bundle_dir):
    """The exported router graph (its prior bonus baked in) and the runtime's top-k."""
    from fastsam2.runtime.session import Session

    s = Session.open(bundle_dir, keep=KEEP, backend="ort-cpu", num_frames=FRAMES, warn=lambda m: None)
    assert s.backend == "ort-cpu"
    violations = prior_check(s, frames, small_mask(stream_video), pruned.router, KEEP)
    assert not violations, violations
