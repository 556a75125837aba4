"""The test's own idea of which tokens a tracked frame keeps, computed apart from the runtime:
- top-k: the k highest router scores (np.argsort, stable), k = max(floor, ceil(keep * T));
- the prior: every token in or near the previous mask (a low-res logit > 0 inside the token's
  4x4 cell, the grid dilated by PRIOR_MARGIN tokens, a square window) is kept.

The runtime's top_k_tokens leaves the order among equal scores open (np.argpartition), so a
tie at the k-th score may be settled either way: near scores (within `tol`, relative) count as
tied, and the oracle accepts any choice inside the tied group. The pruned reference
(pruned_reference.py) takes its kept set from `oracle_top_k` over the PyTorch router's scores on
SAM2's own features and logits, never from the indices our tracker chose.
"""

from __future__ import annotations

import math

import numpy as np

PRIOR_MARGIN = 2  # the router's documented margin (export/graphs/router.py, Router.prior_margin)
KEEP_FLOOR = 64  # the runtime's default floor of k (README: k = max(64, ceil(keep * T)))


def k_for(keep: float, num_tokens: int, floor: int = KEEP_FLOOR) -> int:
    return int(min(num_tokens, max(min(floor, num_tokens), math.ceil(keep * num_tokens - 1e-9))))


def _split(scores: np.ndarray, k: int, tol: float):
    """(tokens certainly kept, the tied group at the k-th score, how many of it are kept)."""
    s = np.asarray(scores, np.float64).reshape(-1)
    order = np.argsort(-s, kind="stable")
    kth = s[order[k - 1]]
    tol = tol * max(1.0, abs(kth))  # relative: prior tokens score ~1e3, where float32 steps are 6e-5
    sure = np.flatnonzero(s > kth + tol)
    group = np.flatnonzero(np.abs(s - kth) <= tol)
    return sure, group, k - sure.size


def oracle_top_k(scores: np.ndarray, k: int, tol: float = 0.0, prefer: np.ndarray | None = None):
    """(the k highest scores' grid indices, ascending; whether a tie had to be settled).

    Inside a tied group the choice of `prefer` (our tracker's kept set) is taken when it is a
    valid one, otherwise the highest scores, lowest index first: only a tie can make the
    reference depend on what we chose.
    """
    s = np.asarray(scores).reshape(-1)
    if k >= s.size:
        return np.arange(s.size, dtype=np.int64), False
    sure, group, need = _split(s, k, tol)
    tied = group.size > need
    pick = None
    if tied and prefer is not None:
        pick = np.intersect1d(np.asarray(prefer), group)
        pick = pick if pick.size == need else None
    if pick is None:
        pick = group[np.argsort(-s[group], kind="stable")[:need]]
    return np.sort(np.concatenate([sure, pick])).astype(np.int64), tied


def top_k_violation(scores: np.ndarray, kept: np.ndarray, k: int, tol: float = 0.0) -> str | None:
    """Why `kept` is not a set of the k highest scores (None when it is)."""
    kept = np.asarray(kept).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    if kept.size != k or np.unique(kept).size != k:
        return f"{kept.size} tokens ({np.unique(kept).size} distinct) kept, top-{k} expected"
    if k >= s.size:
        return None
    sure, group, _ = _split(s, k, tol)
    lost = np.setdiff1d(sure, kept).size
    extra = np.setdiff1d(kept, np.union1d(sure, group)).size
    if lost or extra:
        return f"not the top-{k} of the router's scores ({lost} of them dropped, {extra} lower ones kept)"
    return None


def prior_tokens(prev_logits: np.ndarray, grid: int, margin: int = PRIOR_MARGIN) -> np.ndarray:
    """Grid indices of the tokens in or near the previous mask (low-res logits [4G, 4G])."""
    m = np.asarray(prev_logits, np.float32).reshape(4 * grid, 4 * grid) > 0
    inside = m.reshape(grid, 4, grid, 4).any(axis=(1, 3))
    near = np.zeros_like(inside)
    ys, xs = np.nonzero(inside)
    for y, x in zip(ys, xs):
        near[max(0, y - margin):y + margin + 1, max(0, x - margin):x + margin + 1] = True
    return np.flatnonzero(near.reshape(-1)).astype(np.int64)


def prior_violation(prior: np.ndarray, kept: np.ndarray) -> str | None:
    """Why `kept` loses tokens of the prior (None when it keeps them all; when the prior holds
    more than k tokens, every kept token must be a prior token)."""
    kept = np.asarray(kept).reshape(-1)
    if prior.size <= kept.size:
        lost = np.setdiff1d(prior, kept).size
        return f"{lost} of {prior.size} prior tokens (in/near the previous mask) dropped" if lost else None
    outside = np.setdiff1d(kept, prior).size
    return f"{outside} tokens outside a prior of {prior.size} > k kept" if outside else None


class RouterTopK:
    """The reference's choice of kept tokens on each tracked frame: the PyTorch router on
    SAM2's own top-level features and SAM2's previous low-res logits, then `oracle_top_k`.
    Records per frame: kept, the prior, and whether a tie was settled from `prefer`."""

    def __init__(self, router, k: int, text_emb: np.ndarray, tol: float = 0.0, prefer: dict | None = None,
                 margin: int = PRIOR_MARGIN):
        self.router, self.k, self.tol, self.margin = router, k, tol, margin
        self.text_emb = np.asarray(text_emb, np.float32).reshape(1, -1)
        self.prefer = prefer or {}
        self.kept, self.prior, self.scores, self.ties = {}, {}, {}, []

    def __call__(self, frame_idx: int, feat, prev_logits) -> np.ndarray:
        """feat [1, C, G, G], prev_logits [1, 1, 4G, 4G] (torch tensors) -> kept grid indices."""
        import torch

        with torch.inference_mode():
            scores, _ = self.router(feat.float(), torch.from_numpy(self.text_emb), prev_logits.float())
        s = self.scores[frame_idx] = scores.reshape(-1).float().numpy()
        kept, tied = oracle_top_k(s, self.k, self.tol, self.prefer.get(frame_idx))
        if tied:
            self.ties.append(frame_idx)
        self.kept[frame_idx] = kept
        self.prior[frame_idx] = prior_tokens(prev_logits.float().numpy(), feat.shape[-1], self.margin)
        return kept

    def divergence(self, prefer: dict) -> int | None:
        """The first frame where `prefer` settles a tie otherwise than this run did (None: the
        reference run with it would repeat this one exactly). Before that frame, it would
        repeat it too: the scores up to a tie do not depend on `prefer`."""
        return next((f for f in sorted(self.ties) if not np.array_equal(
            oracle_top_k(self.scores[f], self.k, self.tol, prefer.get(f))[0], self.kept[f])), None)

    def violations(self, ours: dict, our_scores: dict | None = None, before: int | None = None) -> list:
        """What breaks the oracle (on frames before `before`): our kept set vs the reference's
        top-k (and vs the top-k of the scores our own router returned), the prior lost by ours
        or by the router's scores."""
        out = []
        for f in sorted(f for f in self.kept if before is None or f < before):
            mine = ours.get(f)
            if mine is None:
                out.append(f"frame {f}: our tracker kept nothing")
                continue
            if not np.array_equal(np.sort(mine), self.kept[f]):
                n = np.setdiff1d(self.kept[f], mine).size
                out.append(f"frame {f}: our kept set is not the reference's top-{self.k} ({n} tokens differ)")
            if our_scores is not None and f in our_scores:
                why = top_k_violation(our_scores[f], mine, self.k)
                if why:
                    out.append(f"frame {f}: ours {why}")
            for who, kept in (("ours", mine), ("the router's top-k", self.kept[f])):
                why = prior_violation(self.prior[f], kept)
                if why:
                    out.append(f"frame {f}: {who}: {why}")
        return out


class Recorder:
    """Wraps a graph session: records, per frame, copies of some of its feeds and outputs."""

    def __init__(self, inner, feeds=(), outputs=()):
        self.inner, self.frame, self.feeds, self.outputs = inner, None, feeds, outputs
        self.got = {}

    def run(self, feeds):
        assert self.frame not in self.got, f"{self.feeds or self.outputs} recorded twice on frame {self.frame}"
        out = self.inner.run(feeds)
        self.got[self.frame] = {**{n: np.array(feeds[n], copy=True) for n in self.feeds},
                                **{n: np.array(out[n], copy=True) for n in self.outputs}}
        return out


def prior_check(session, frames: list, mask: np.ndarray, router, keep: float, obj_id: int = 1) -> list:
    """Our session on `frames`, prompted on frame 0 with `mask` (bool H x W, small, so that the
    prior is a small part of the grid, which SAM2's large masks on the test model never leave):
    on each tracked frame, its kept set against the top-k of the PyTorch router's scores on the
    frame's features and the previous frame's logits as the session returned them (no text),
    and against the prior of those logits. Returns the violations (none: the oracle holds)."""
    import torch

    recs = {"image_encoder": Recorder(session.sessions["image_encoder"], outputs=("feat",)),
            "memory_attention": Recorder(session.sessions["memory_attention"], feeds=("curr_idx",)),
            "router": Recorder(session.sessions["router"], feeds=("text_emb",), outputs=("scores",))}
    inner = {name: session.sessions[name] for name in recs}
    session.sessions.update(recs)
    try:
        logits = {}
        for t, rgb in enumerate(frames):
            if t == 0:
                session.add_prompt(obj_id, frame=0, mask=mask)
            for r in recs.values():
                r.frame = t
            logits[t] = np.array(session.push(rgb).objects[obj_id].logits, np.float32)
    finally:
        session.sessions.update(inner)
    feat = recs["image_encoder"].got[1]["feat"]
    T = feat.shape[-1] * feat.shape[-2]
    oracle = RouterTopK(router, k_for(keep, T), np.zeros_like(recs["router"].got[1]["text_emb"]),
                        tol=1e-6, prefer={f: g["curr_idx"] for f, g in recs["memory_attention"].got.items()})
    for t in range(1, len(frames)):
        oracle(t, torch.from_numpy(recs["image_encoder"].got[t]["feat"]),
               torch.from_numpy(logits[t - 1].reshape(1, 1, *logits[t - 1].shape[-2:])))
    assert 0 < oracle.prior[1].size < oracle.k, (oracle.prior[1].size, oracle.k)  # the prior is not vacuous
    assert all(not g["text_emb"].any() for g in recs["router"].got.values())
    kept = {f: g["curr_idx"] for f, g in recs["memory_attention"].got.items()}
    return oracle.violations(kept, {f: g["scores"] for f, g in recs["router"].got.items()})
