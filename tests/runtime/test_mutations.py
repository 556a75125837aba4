"""The parity checks must catch real bugs: each known-bug patch below is applied in this
process (restored after) and at least one parity or oracle check must fail under it. A bug
class found later goes on the list.

Two kinds of patch: a source patch (the module's source with one line changed, executed as a
fresh module that replaces its functions and classes everywhere), and, for the pruned path, a
patch of a function or a wrapper around a graph session (the router's top-k, the prior bonus
and margin, the gathers of the kept tokens and their positions, the bank's gather, the scatter
back to the grid), which survives edits of the code around it.

The checks are the session parity scenarios (tests/runtime/official_stream.py: a prompt on a
later frame, a correction of a tracked frame, more prompts than attended conditioning frames, an
object that starts late), for the pruned path that SAM2 itself does not have the independent
pruned reference (tests/runtime/pruned_reference.py: SAM2 on the router's top-k, not on our
kept set) and the router oracle on a small previous mask (tests/runtime/router_oracle.py: the
kept set is the top-k of the router's scores and holds every prior token), all through the
PyTorch graph modules with the tolerance of the parity tests. The pruned reference runs once
unmutated and is reused while a mutation leaves its choice of tokens as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from test_router_oracle import KEEP, small_mask
from test_session_parity import MIN_IOU, TORCH_ATOL


@dataclass(frozen=True)
class Mutation:
    name: str
    module: str = ""  # a source patch: `old` replaced by `new` in the module's source
    old: str = ""
    new: str = ""
    checks: tuple = ("correction",)
    patch: Callable | None = None  # or patch(pruned) -> a context manager that injects the bug
    router: bool = False  # the patch changes the PyTorch router, which the pruned reference runs too


# modules whose references to a patched function are swapped: the runtime, export, test helpers
HELPERS = ("official_stream", "pruned_reference", "router_oracle", "test_session_parity")


def _swap_everywhere(replacement) -> list:
    """In every runtime/export/helper module, each name whose value `replacement(value)` maps to
    something (not None) is set to it; returns [(module, name, original)] to undo."""
    swaps = []
    for other in list(sys.modules.values()):
        name = getattr(other, "__name__", "") or ""
        if not (name.startswith("fastsam2") or name in HELPERS):
            continue
        for attr, val in list(vars(other).items()):
            new = replacement(val)
            if new is not None:
                swaps.append((other, attr, val))
                setattr(other, attr, new)
    return swaps


def swapped(module: str, name: str, make):
    """A patch: `module.name` replaced by make(original) wherever a module holds it."""

    @contextlib.contextmanager
    def patch(pruned):
        original = getattr(importlib.import_module(module), name)
        patched = make(original)
        swaps = _swap_everywhere(lambda v: patched if v is original else None)
        try:
            yield
        finally:
            for other, attr, val in swaps:
                setattr(other, attr, val)

    return patch


def memory_attention_feeds(change):
    """A patch: the memory attention graph of every PyTorch session fed change(feeds, frame
    tokens [T, C], constants) instead of what the tracker gathered. The frame's tokens come from
    the router's `feat` feed (the router runs on every pruned frame, right before)."""

    def make(torch_sessions):
        def wrapped(pruned):
            sessions = torch_sessions(pruned)
            router, attention, seen = sessions["router"], sessions["memory_attention"], {}

            class Router:
                def run(self, feeds):
                    seen["tokens"] = feeds["feat"].reshape(feeds["feat"].shape[1], -1).T
                    return router.run(feeds)

            class MemoryAttention:
                def run(self, feeds):
                    if "tokens" in seen and feeds["curr_idx"].size < len(seen["tokens"]):
                        feeds = {**feeds, **change(feeds, seen["tokens"], pruned.constants())}
                    return attention.run(feeds)

            return {**sessions, "router": Router(), "memory_attention": MemoryAttention()}

        return wrapped

    return swapped("fastsam2.export.torch_backend", "torch_sessions", make)


@contextlib.contextmanager
def bank_gathers_first_tokens(pruned):
    """MemoryBank.add_frame storing the first n tokens' features under the kept indices."""
    from fastsam2.runtime.bank import MemoryBank

    original = MemoryBank.add_frame

    def add_frame(self, frame_idx, maskmem, kept_idx, obj_ptr):
        flat = maskmem.reshape(maskmem.shape[1], -1)
        moved = flat.copy()
        moved[:, kept_idx] = flat[:, :kept_idx.size]  # gathering at kept_idx now reads the first n
        return original(self, frame_idx, moved.reshape(maskmem.shape), kept_idx, obj_ptr)

    MemoryBank.add_frame = add_frame
    try:
        yield
    finally:
        MemoryBank.add_frame = original


@contextlib.contextmanager
def prior_margin_zero(pruned):
    saved, pruned.router.prior_margin = pruned.router.prior_margin, 0
    try:
        yield
    finally:
        pruned.router.prior_margin = saved


MUTATIONS = (
    Mutation("memory temporal encodings in reversed order", "fastsam2.runtime.bank",
             "tpos[self.num_maskmem - t_pos - 1]", "tpos[t_pos - 1]"),
    Mutation("maskmem_tpos_enc dropped", "fastsam2.runtime.bank",
             "self._pos[m:m + n] = pos_table[idx] + tpos[self.num_maskmem - t_pos - 1]",
             "self._pos[m:m + n] = pos_table[idx]"),
    Mutation("object-pointer temporal projection zeroed", "fastsam2.runtime.bank",
             'pe = pe @ c["obj_ptr_tpos_w"].T + c["obj_ptr_tpos_b"]',
             'pe = 0 * (pe @ c["obj_ptr_tpos_w"].T + c["obj_ptr_tpos_b"])'),
    Mutation("RoPE gathered at wrong indices (memory)", "fastsam2.runtime.bank",
             "self._midx[ms:ms + n] = idx", "self._midx[ms:ms + n] = self._all[:n]", ("pruned",)),
    Mutation("RoPE gathered at wrong indices (queries)", "fastsam2.runtime.tracker",
             '"curr_idx": idx,', '"curr_idx": np.arange(idx.size, dtype=np.int64),', ("pruned",)),
    Mutation("no_mem_embed missing on pruned positions", "fastsam2.runtime.tracker",
             'base = tokens + self.no_mem if self.fill == "no_mem"', 'base = tokens if self.fill == "no_mem"',
             ("pruned",)),
    Mutation("memory frames in the wrong order", "fastsam2.runtime.bank",
             "t_rel = self.num_maskmem - t_pos", "t_rel = t_pos"),
    Mutation("wrong conditioning frames attended (newest evicted)", "fastsam2.runtime.bank",
             "oldest = min(range(len(self.cond)), key=lambda i: self.cond[i][0])",
             "oldest = max(range(len(self.cond)), key=lambda i: self.cond[i][0])", ("bounded",)),
    Mutation("evicted conditioning frame forgotten (not kept as past memory)", "fastsam2.runtime.bank",
             "        slot = frame_idx % len(self.frame)\n        if self.frame[slot] < frame_idx:",
             "        slot = frame_idx % len(self.frame)\n        if False:", ("bounded",)),
    Mutation("object-pointer frame index off by one", "fastsam2.runtime.bank",
             "pos.append(t_diff)", "pos.append(t_diff + 1)"),
    Mutation("a tracked frame's entry kept when it becomes a conditioning frame", "fastsam2.runtime.bank",
             "        self.drop_tracked(frame_idx)\n        for i, (f, _, _) in enumerate(self.cond):",
             "        for i, (f, _, _) in enumerate(self.cond):", ("tracked_correction_cond",)),
    Mutation("correction without the frame's current logits", "fastsam2.runtime.tracker",
             'lat,\n                                                mask_input=self._current_logits(frame_idx))\n'
             '        binarize = bool(self.settings["binarize_mask_from_pts_for_mem_enc"])\n        maskmem = self._memory(enc, low, obj_score, binarize, lat)\n'
             '        if self.correct_as_cond:',
             'lat,\n                                                mask_input=None)\n'
             '        binarize = bool(self.settings["binarize_mask_from_pts_for_mem_enc"])\n        maskmem = self._memory(enc, low, obj_score, binarize, lat)\n'
             '        if self.correct_as_cond:', ("tracked_correction",)),
    Mutation("prompted frame's memory not binarised", "fastsam2.runtime.tracker",
             'multimask, lat,\n                                                mask_input=self._current_logits(frame_idx))\n'
             '        binarize = bool(self.settings["binarize_mask_from_pts_for_mem_enc"])\n        maskmem = self._memory(enc, low, obj_score, binarize, lat)\n'
             '        self.bank.add_conditioning(frame_idx, maskmem, ptr)\n        self.prev_grid',
             'multimask, lat,\n                                                mask_input=self._current_logits(frame_idx))\n'
             '        binarize = False\n        maskmem = self._memory(enc, low, obj_score, binarize, lat)\n'
             '        self.bank.add_conditioning(frame_idx, maskmem, ptr)\n        self.prev_grid'),
    Mutation("late object tracked on the video's time axis", "fastsam2.runtime.session",
             "local = [t - self._start[o] for o in objs]", "local = [t for o in objs]", ("late",)),
    # the pruned path: router, top-k, gathers, bank, scatter (patched functions / wrapped graphs)
    Mutation("top-k keeps the lowest scores", checks=("prior",),
             patch=swapped("fastsam2.runtime.sam2_math", "top_k_tokens", lambda top_k: lambda s, k: top_k(-s, k))),
    Mutation("top-k off by one (the highest score dropped, the (k+1)-th kept)", checks=("prior",),
             patch=swapped("fastsam2.runtime.sam2_math", "top_k_tokens", lambda top_k: lambda s, k: np.sort(
                 np.argsort(-s.reshape(-1), kind="stable")[1:k + 1]).astype(np.int64))),
    Mutation("router's prior bonus dropped", checks=("prior",), router=True,
             patch=swapped("fastsam2.export.graphs.router", "PRIOR_BONUS", lambda bonus: 0.0)),
    Mutation("router's prior not dilated by the margin", checks=("prior",), router=True, patch=prior_margin_zero),
    Mutation("token gather: the first k tokens instead of the kept ones", checks=("pruned",),
             patch=memory_attention_feeds(lambda f, tokens, c: {"curr": tokens[:f["curr_idx"].size].copy()})),
    Mutation("position-encoding gather: vision_pos of the first k tokens", checks=("pruned",),
             patch=memory_attention_feeds(lambda f, tokens, c: {"curr_pos": c["vision_pos"][:f["curr_idx"].size]})),
    Mutation("position-encoding gather: vision_pos of the neighbouring kept token", checks=("pruned",),
             patch=memory_attention_feeds(lambda f, tokens, c: {"curr_pos": c["vision_pos"][np.roll(f["curr_idx"], 1)]})),
    Mutation("bank stores the first n tokens' features of a tracked frame", checks=("pruned",),
             patch=bank_gathers_first_tokens),
    Mutation("scatter: each conditioned token at the neighbouring kept position", checks=("pruned",),
             patch=swapped("fastsam2.runtime.sam2_math", "scatter_tokens",
                           lambda scatter: lambda fill, idx, values: scatter(fill, np.roll(idx, 1), values))),
)


@contextlib.contextmanager
def mutated(m: Mutation, pruned):
    """The module's source with the patch, executed as a fresh module; every fastsam2 module
    (and test helper) that refers to one of its functions or classes gets the patched one.
    A mutation with `patch` is that patch instead."""
    if m.patch is not None:
        with m.patch(pruned):
            yield
        return
    mod = importlib.import_module(m.module)
    src = inspect.getsource(mod)
    assert src.count(m.old) == 1, f"{m.name}: the patch no longer applies to {m.module} (update the list)"
    new_mod = types.ModuleType(m.module)
    new_mod.__file__ = mod.__file__
    new_mod.__package__ = mod.__package__
    exec(compile(src.replace(m.old, m.new), mod.__file__, "exec"), new_mod.__dict__)
    own = {id(v): k for k, v in vars(mod).items()
           if (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", None) == m.module}
    swaps = _swap_everywhere(lambda v: getattr(new_mod, own[id(v)]) if id(v) in own else None)
    try:
        yield
    finally:
        for other, attr, val in swaps:
            setattr(other, attr, val)


class CachedEncoder:
    """The image encoder's outputs per frame, computed once: the mutations are all downstream."""

    def __init__(self, inner, cache: dict):
        self.inner, self.cache = inner, cache

    def run(self, feeds):
        key = hashlib.sha1(feeds["image"].tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.inner.run(feeds)
        return self.cache[key]


@pytest.fixture(scope="module")
def encoder_cache():
    return {}


def session(pruned, cache, **opts):
    from fastsam2.export.torch_backend import torch_sessions
    from fastsam2.runtime.session import Session

    sessions = torch_sessions(pruned)
    sessions["image_encoder"] = CachedEncoder(sessions["image_encoder"], cache)
    return Session(sessions, pruned.constants(), pruned.settings, num_frames=10, **opts)


@pytest.fixture(scope="module")
def pruned_refs():
    """The unmutated pruned reference (SAM2 on the router's top-k), computed once and reused by
    the mutations that leave its choice of tokens as it was (pruned_reference_check decides)."""
    return {}


@pytest.fixture(scope="module")
def prior_frames(stream_video):
    from official_stream import read_frames
    from test_router_oracle import FRAMES

    return read_frames(stream_video.frames_dir_or_file)[:FRAMES]


def run_check(name, pruned, scenarios, cache, stream_video, refs, frames, m: Mutation | None = None) -> tuple:
    """(max-abs logits, min IoU, oracle violations) of one check."""
    if name == "pruned":
        from pruned_reference import pruned_reference_check

        d = {}
        got = pruned_reference_check(pruned, scenarios.predictor_loaded, stream_video.frames_dir_or_file,
                                     stream_video.first_frame_points[1], keep=KEEP, details=d,
                                     reference=None if m is not None and m.router else refs.get("pruned"),
                                     caught_above=TORCH_ATOL)
        if m is None:
            refs["pruned"] = d["reference"]
        print(f"  (pruned reference reused: {d['reused']})")
        return got
    if name == "prior":
        from pruned_reference import torch_session
        from router_oracle import prior_check

        violations = prior_check(torch_session(pruned, KEEP, len(frames)), frames, small_mask(stream_video),
                                 pruned.router, KEEP)
        return 0.0, 1.0, violations
    return scenarios.check(name, session(pruned, cache, **scenarios.options(name))) + ([],)


ALL_CHECKS = ("correction", "tracked_correction", "tracked_correction_cond", "bounded", "late", "pruned", "prior")


def test_parity_checks_pass_before_any_mutation(pruned, scenarios, encoder_cache, stream_video, pruned_refs,
                                                prior_frames):
    for name in ALL_CHECKS:
        worst, iou, violations = run_check(name, pruned, scenarios, encoder_cache, stream_video, pruned_refs,
                                           prior_frames)
        print(f"{name}: max-abs {worst:.2e}, min IoU {iou:.5f}, oracle violations {violations}")
        assert worst <= TORCH_ATOL and iou >= MIN_IOU and not violations, name


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_is_caught(m, pruned, scenarios, encoder_cache, stream_video, pruned_refs, prior_frames):
    with mutated(m, pruned):
        got = {c: run_check(c, pruned, scenarios, encoder_cache, stream_video, pruned_refs, prior_frames, m)
               for c in m.checks}
    print(m.name, {c: f"max-abs {w:.2e}, IoU {i:.4f}, {len(v)} oracle violations {v[:2]}"
                   for c, (w, i, v) in got.items()})
    assert any(w > TORCH_ATOL or i < MIN_IOU or v for w, i, v in got.values()), f"not caught: {m.name} {got}"
