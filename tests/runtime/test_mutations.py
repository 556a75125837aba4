"""The parity checks must catch real bugs: each known-bug patch below is applied to the runtime's
source (in this process, restored after) and at least one parity check against
SAM2VideoPredictor must fail under it. A bug class found later goes on the list.

The checks are the session parity scenarios (tests/runtime/official_stream.py: a prompt on a
later frame, a correction of a tracked frame, more prompts than attended conditioning frames, an
object that starts late) and, for the pruned path that SAM2 itself does not have, the
independent pruned reference (tests/runtime/pruned_reference.py), all through the PyTorch graph
modules with the tolerance of the parity tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import sys
import types
from dataclasses import dataclass

import pytest

from test_session_parity import MIN_IOU, TORCH_ATOL


@dataclass(frozen=True)
class Mutation:
    name: str
    module: str
    old: str
    new: str
    checks: tuple = ("correction",)


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
             '        binarize = bool(self.s["binarize_mask_from_pts_for_mem_enc"])\n        maskmem = self._memory(enc, low, obj_score, binarize, lat)\n'
             '        if self.correct_as_cond:',
             'lat,\n                                                mask_input=None)\n'
             '        binarize = bool(self.s["binarize_mask_from_pts_for_mem_enc"])\n        maskmem = self._memory(enc, low, obj_score, binarize, lat)\n'
             '        if self.correct_as_cond:', ("tracked_correction",)),
    Mutation("prompted frame's memory not binarised", "fastsam2.runtime.tracker",
             'multimask, lat,\n                                                mask_input=self._current_logits(frame_idx))\n'
             '        binarize = bool(self.s["binarize_mask_from_pts_for_mem_enc"])\n        maskmem = self._memory(enc, low, obj_score, binarize, lat)\n'
             '        self.bank.add_conditioning(frame_idx, maskmem, ptr)\n        self.prev_grid',
             'multimask, lat,\n                                                mask_input=self._current_logits(frame_idx))\n'
             '        binarize = False\n        maskmem = self._memory(enc, low, obj_score, binarize, lat)\n'
             '        self.bank.add_conditioning(frame_idx, maskmem, ptr)\n        self.prev_grid'),
    Mutation("late object tracked on the video's time axis", "fastsam2.runtime.session",
             "step = tr.track(t - self._start[o], None, enc=self._encoded())",
             "step = tr.track(t, None, enc=self._encoded())", ("late",)),
)


@contextlib.contextmanager
def mutated(m: Mutation):
    """The module's source with the patch, executed as a fresh module; every fastsam2 module
    (and test helper) that refers to one of its functions or classes gets the patched one."""
    mod = importlib.import_module(m.module)
    src = inspect.getsource(mod)
    assert src.count(m.old) == 1, f"{m.name}: the patch no longer applies to {m.module} (update the list)"
    new_mod = types.ModuleType(m.module)
    new_mod.__file__ = mod.__file__
    new_mod.__package__ = mod.__package__
    exec(compile(src.replace(m.old, m.new), mod.__file__, "exec"), new_mod.__dict__)
    own = {id(v): k for k, v in vars(mod).items()
           if (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", None) == m.module}
    swaps = []
    for other in list(sys.modules.values()):
        name = getattr(other, "__name__", "") or ""
        if not (name.startswith("fastsam2") or name in ("official_stream", "pruned_reference", "test_session_parity")):
            continue
        for attr, val in list(vars(other).items()):
            if id(val) in own:
                swaps.append((other, attr, val))
                setattr(other, attr, getattr(new_mod, own[id(val)]))
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


def run_check(name, pruned, scenarios, cache, stream_video) -> tuple:
    if name == "pruned":
        from pruned_reference import pruned_reference_check

        return pruned_reference_check(pruned, scenarios.predictor_loaded, stream_video.frames_dir_or_file,
                                      stream_video.first_frame_points[1], keep=0.5)
    return scenarios.check(name, session(pruned, cache, **scenarios.options(name)))


ALL_CHECKS = ("correction", "tracked_correction", "tracked_correction_cond", "bounded", "late", "pruned")


def test_parity_checks_pass_before_any_mutation(pruned, scenarios, encoder_cache, stream_video):
    for name in ALL_CHECKS:
        worst, iou = run_check(name, pruned, scenarios, encoder_cache, stream_video)
        print(f"{name}: max-abs {worst:.2e}, min IoU {iou:.5f}")
        assert worst <= TORCH_ATOL and iou >= MIN_IOU, name


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_is_caught(m, pruned, scenarios, encoder_cache, stream_video):
    with mutated(m):
        got = {c: run_check(c, pruned, scenarios, encoder_cache, stream_video) for c in m.checks}
    print(m.name, {c: f"max-abs {w:.2e}, IoU {i:.4f}" for c, (w, i) in got.items()})
    assert any(w > TORCH_ATOL or i < MIN_IOU for w, i in got.values()), f"not caught: {m.name} {got}"
