"""The tracking loop: SAM2's video predictor for one object, with the router in front of memory
attention. Backend-agnostic: `sessions[name].run(feeds) -> outputs` with numpy arrays, so the
same loop drives ONNX Runtime, TensorRT, or the PyTorch modules (fastsam2.export.torch_backend).

Per frame, as `SAM2Base.track_step` with the video predictor's settings:
  prompted frame:  encode -> feat + no_mem_embed -> decoder(points) -> memory encoder (binarised)
  tracked frame:   encode -> router -> top-k -> memory attention on k tokens -> scatter back
                   (pruned tokens take feat + no_mem_embed) -> decoder -> memory encoder
  corrected frame: a tracked frame's memory-conditioned features -> decoder(points, the frame's
                   current logits as mask input) -> memory encoder (binarised); SAM2's
                   add_new_points_or_box on a frame it has already tracked
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fastsam2.runtime.bank import DEFAULT_MAX_COND, MemoryBank, Revision
from fastsam2.runtime.contract import DEFAULT_KEEP_RANGE, keep_to_k
from fastsam2.runtime.sam2_math import (
    Resizer,
    preprocess,
    scatter_tokens,
    select_mask,
    top_k_tokens,
    use_multimask,
)

FILL_MODES = ("no_mem", "last")


@dataclass
class ObjectStep:
    """One object's output on one frame (the tracker's own time axis: frames since its start)."""

    frame_idx: int
    low_res_logits: np.ndarray  # [1, 1, S/4, S/4] SAM2's pred_masks (before resizing)
    object_score: float
    iou: float
    kept_tokens: int
    latency_ms: dict = field(default_factory=dict)
    prompted: bool = False  # set by the session: a prompt was applied on this frame
    kept_idx: np.ndarray | None = None  # grid indices that entered memory attention (None: none did)
    budget: dict | None = None  # --keep auto: prior / mass / motion behind this frame's k


@dataclass
class Prompt:
    """First-frame prompt in model coordinates (pixels of the S x S input)."""

    points: np.ndarray  # [P, 2] float32 (x, y)
    labels: np.ndarray  # [P] float32: 1 positive, 0 negative, 2/3 box corners


class AdaptiveBudget:
    """`--keep auto`: a per-frame token budget in [k_min, k_max] (beyond the paper, which fixes
    keep). Two signals:
    - score mass: the fewest tokens holding `mass` of softmax(router scores) outside the prior
      region, plus every prior token (in/near the previous mask);
    - motion: the mean feature change since the last frame relative to the feature norm;
      a moving scene widens the budget by (1 + gain * motion).
    """

    def __init__(self, num_tokens: int, k_min: int, k_max: int, mass: float = 0.8, gain: float = 2.0):
        self.T, self.k_min, self.k_max = num_tokens, k_min, k_max
        self.mass, self.gain = mass, gain
        self.prev = None
        self.last_motion = 0.0

    def __call__(self, scores: np.ndarray, tokens: np.ndarray) -> int:
        from fastsam2.runtime.sam2_math import PRIOR_SCORE

        prior = scores >= PRIOR_SCORE
        rest = np.sort(scores[~prior])[::-1]
        if rest.size:
            p = np.exp(rest - rest[0])
            k_mass = int(np.searchsorted(np.cumsum(p) / p.sum(), self.mass) + 1)
        else:
            k_mass = 0
        if self.prev is not None:
            diff = np.linalg.norm(tokens - self.prev, axis=1).mean()
            self.last_motion = float(diff / (np.linalg.norm(tokens, axis=1).mean() + 1e-6))
        self.prev = tokens.copy()
        k = (int(prior.sum()) + k_mass) * (1.0 + self.gain * self.last_motion)
        kept = int(np.clip(round(k), self.k_min, self.k_max))
        # why this budget: results.json records it, the run's summary explains a full one
        self.last = {"prior": int(prior.sum()), "mass": k_mass, "motion": round(self.last_motion, 4), "k": kept}
        return kept


class Tracker:
    """One object's SAM2 video loop. Frame indices are the object's own (0 = its first prompt),
    so an object that starts late behaves as SAM2 run on the video from that frame on."""

    def __init__(self, sessions: dict, constants: dict, settings: dict, keep: float | str = 1.0,
                 keep_floor: int = 64, fill: str = "no_mem", text_emb: np.ndarray | None = None,
                 num_frames: int | None = None, keep_range: tuple = DEFAULT_KEEP_RANGE,
                 max_cond: int = DEFAULT_MAX_COND, correct_as_cond: bool | None = None,
                 clock: Revision | None = None):
        if fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}")
        # the session's change counter: what a snapshot increment must carry (runtime/snapshot.py)
        self.clock = clock or Revision()
        self.created_rev = self.state_rev = self.clock.now
        self.sessions = sessions
        self.constants = constants
        self.settings = settings
        self.S = settings["image_size"]
        self.G = self.S // 16
        self.T = self.G * self.G
        self.keep = keep
        self.adaptive = keep == "auto"
        if self.adaptive:
            self.budget = AdaptiveBudget(self.T, keep_to_k(keep_range[0], self.T, keep_floor),
                                         keep_to_k(keep_range[1], self.T, keep_floor))
            self.k = self.budget.k_max
        else:
            self.k = keep_to_k(keep, self.T, keep_floor)
        self.fill = fill
        self.num_frames = num_frames
        # SAM2VideoPredictor.add_all_frames_to_correct_as_cond (False in the released configs)
        self.correct_as_cond = bool(settings.get("add_all_frames_to_correct_as_cond", False)
                                    if correct_as_cond is None else correct_as_cond)
        self.set_text(text_emb)
        self.bank = MemoryBank(self.T, settings, constants, max_cond=max_cond, clock=self.clock)
        self.no_mem = constants["no_mem_embed"].reshape(1, -1).astype(np.float32)
        self.prev_logits = None
        self.prev_grid = None  # last frame's conditioned [T, C] ("last" fill)
        self.frame_idx = -1
        # the last frame's encoder outputs and decoder input, for a correction on that frame
        self._last_frame = None

    def set_text(self, text_emb: np.ndarray | None) -> None:
        dim = self.settings.get("text_dim", 512)
        self.text_rev = self.clock.now
        self.text_emb = (np.zeros((1, int(dim)), np.float32) if text_emb is None
                         else np.asarray(text_emb, np.float32).reshape(1, -1))

    # -- helpers -----------------------------------------------------------------------------
    def _run(self, name: str, feeds: dict, lat: dict) -> dict:
        t0 = time.perf_counter()
        out = self.sessions[name].run(feeds)
        lat[name] = lat.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        return out

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        return preprocess(rgb, self.S, self.settings["image_mean"], self.settings["image_std"])

    def encode(self, image: np.ndarray, lat: dict) -> dict:
        return self._run("image_encoder", {"image": image}, lat)

    def relevance(self, enc: dict, lat: dict | None = None) -> np.ndarray:
        """Router text relevance [T] of a frame, with no previous mask (search-and-track)."""
        lat = {} if lat is None else lat
        out = self._run("router", {"feat": enc["feat"], "text_emb": self.text_emb,
                                   "prev_mask_logits": np.zeros((1, 1, 4 * self.G, 4 * self.G), np.float32)}, lat)
        return out["relevance"].reshape(-1)

    def decoder_feeds(self, pix, enc, prompt: Prompt | None = None, mask_input: np.ndarray | None = None) -> dict:
        """The mask decoder's feeds for pix [B, C, G, G]: one object, or a frame's tracked objects
        as the batch (no prompt, no mask input: runtime/batched.py)."""
        b, g4 = pix.shape[0], 4 * self.G
        if prompt is None:
            # SAM2 feeds one padding point (label -1) when there is no prompt
            coords = np.zeros((b, 1, 2), np.float32)
            labels = -np.ones((b, 1), np.float32)
        else:
            coords = prompt.points.reshape(1, -1, 2).astype(np.float32)
            labels = prompt.labels.reshape(1, -1).astype(np.float32)
        return {
            "feat": pix, "high_res_0": enc["high_res_0"], "high_res_1": enc["high_res_1"],
            "point_coords": coords, "point_labels": labels,
            "mask_input": (np.zeros((b, 1, g4, g4), np.float32) if mask_input is None
                           else mask_input.reshape(1, 1, g4, g4).astype(np.float32)),
            "has_mask_input": np.full((1,), 0.0 if mask_input is None else 1.0, np.float32)}

    def memory_feeds(self, enc, low, object_score, binarize: bool) -> dict:
        """The memory encoder's feeds: low [B, 1, G4, G4] and object_score [B] of B objects."""
        return {"feat": enc["feat"], "mask_logits": low,
                "object_score": np.asarray(object_score, np.float32).reshape(-1, 1),
                "binarize": np.full((1,), 1.0 if binarize else 0.0, np.float32)}

    def _decode(self, pix, enc, prompt: Prompt | None, multimask: bool, lat: dict,
                mask_input: np.ndarray | None = None):
        out = self._run("mask_decoder", self.decoder_feeds(pix, enc, prompt, mask_input), lat)
        return select_mask(self.settings, out["masks"], out["iou"], out["obj_ptrs"], out["object_score"],
                           multimask, self.constants["no_obj_ptr"]) + (out["object_score"],)

    def _memory(self, enc, low, object_score, binarize: bool, lat: dict) -> np.ndarray:
        return self._run("memory_encoder", self.memory_feeds(enc, low, object_score, binarize), lat)["maskmem"]

    def _current_logits(self, frame_idx: int) -> np.ndarray | None:
        """The frame's current mask logits, clamped as SAM2 clamps prev_sam_mask_logits."""
        if self.frame_idx != frame_idx or self.prev_logits is None:
            return None
        return np.clip(self.prev_logits, -32.0, 32.0)

    def _done(self, frame_idx, enc, pix, idx, low) -> None:
        self.state_rev = self.clock.now  # logits, frame, fill and budget state changed
        self.prev_logits = low
        self.frame_idx = frame_idx
        self._last_frame = {"frame": frame_idx, "enc": enc, "pix": pix, "idx": idx}

    # -- the kinds of frame -------------------------------------------------------------------
    def add_prompt_frame(self, frame_idx: int, image: np.ndarray | None, prompt: Prompt,
                         enc: dict | None = None) -> ObjectStep:
        """An initial conditioning frame (SAM2: add_new_points_or_box on a frame it has not
        tracked, then propagate's preflight). Prompted again before tracking goes on, the frame
        is decoded from the new clicks and its current logits, as SAM2 does."""
        lat = {}
        enc = self.encode(image, lat) if enc is None else enc
        feat = enc["feat"]
        pix = feat + self.no_mem.reshape(1, -1, 1, 1)  # directly_add_no_mem_embed
        multimask = use_multimask(self.settings, True, prompt.points.shape[0])
        low, iou, ptr, obj_score = self._decode(pix, enc, prompt, multimask, lat,
                                                mask_input=self._current_logits(frame_idx))
        binarize = bool(self.settings["binarize_mask_from_pts_for_mem_enc"])
        maskmem = self._memory(enc, low, obj_score, binarize, lat)
        self.bank.add_conditioning(frame_idx, maskmem, ptr)
        self.prev_grid = pix.reshape(pix.shape[1], -1).T.copy()
        self._done(frame_idx, enc, pix, None, low)
        return ObjectStep(frame_idx, low, float(obj_score.reshape(-1)[0]), float(iou.reshape(-1)[0]),
                          self.T, lat)

    def add_mask_frame(self, frame_idx: int, image: np.ndarray | None, mask: np.ndarray,
                       enc: dict | None = None, as_cond: bool = True) -> ObjectStep:
        """A frame prompted with a mask (SAM2: add_new_mask; the mask is the output directly,
        `use_mask_input_as_output_without_sam`). A conditioning frame unless it corrects a
        tracked frame (as_cond=False), which then keeps its tracked slot and kept tokens."""
        lat = {}
        enc = self.encode(image, lat) if enc is None else enc
        S, G4 = self.S, 4 * self.G
        m = np.asarray(mask, np.float32)
        if m.shape != (S, S):  # add_new_mask: antialiased resize, then threshold at 0.5
            m = (Resizer(antialias=True)(m, (S, S)) >= 0.5).astype(np.float32)
        high = m * 20.0 - 10.0  # _use_mask_as_output: -10/+10 logits
        low = Resizer(antialias=True)(high, (G4, G4))[None, None].astype(np.float32)
        # the object pointer comes from the decoder fed mask_downsample(mask) on raw features
        w, b = self.constants["mask_downsample_w"], self.constants["mask_downsample_b"]
        ds = np.einsum("iajb,ab->ij", m.reshape(G4, 4, G4, 4), w) + b[0]
        _, _, ptr, _ = self._decode(enc["feat"], enc, None, False, lat, mask_input=ds)
        present = float(m.any())
        obj_score = np.full((1, 1), 20.0 * present - 10.0, np.float32)
        if self.settings["pred_obj_scores"]:
            if self.settings["fixed_no_obj_ptr"]:
                ptr = present * ptr
            ptr = (ptr + (1 - present) * self.constants["no_obj_ptr"][None]).astype(np.float32)
        binarize = bool(self.settings["binarize_mask_from_pts_for_mem_enc"])  # preflight: is_mask_from_pts
        maskmem = self._memory(enc, low, obj_score, binarize, lat)
        kept = self._last_frame["idx"] if (not as_cond and self._last_frame and self._last_frame["frame"] == frame_idx) else None
        if kept is None:
            self.bank.add_conditioning(frame_idx, maskmem, ptr)
        else:
            self.bank.add_frame(frame_idx, maskmem, kept, ptr)
        if kept is None:
            pix = enc["feat"] + self.no_mem.reshape(1, -1, 1, 1)
            self.prev_grid = pix.reshape(pix.shape[1], -1).T.copy()
        else:  # a corrected tracked frame keeps its memory-conditioned decoder input
            pix = self._last_frame["pix"]
        self._done(frame_idx, enc, pix, kept, low)
        return ObjectStep(frame_idx, low, float(obj_score[0, 0]), 1.0,
                          self.T if kept is None else int(kept.size), lat)

    def correct(self, frame_idx: int, prompt: Prompt | None = None,
                mask: np.ndarray | None = None) -> ObjectStep:
        """New clicks (or a mask) on the frame just processed (SAM2: add_new_points_or_box /
        add_new_mask on a frame already tracked, fed the frame's current logits).

        A tracked frame is corrected in place: memory-conditioned features, clicks plus current
        logits, memory re-encoded from the corrected mask (binarised, as SAM2's preflight does);
        it stays a tracked frame unless correct_as_cond (SAM2's add_all_frames_to_correct_as_cond).
        A conditioning frame is re-prompted: the new clicks plus its current logits, no memory.
        """
        last = self._last_frame
        if last is None or last["frame"] != frame_idx:
            raise RuntimeError(f"correct() on frame {frame_idx}; the tracker is at {self.frame_idx}")
        enc = last["enc"]
        if mask is not None:
            return self.add_mask_frame(frame_idx, None, mask, enc=enc,
                                       as_cond=self.correct_as_cond or last["idx"] is None)
        if last["idx"] is None:  # a conditioning frame: prompt it again
            return self.add_prompt_frame(frame_idx, None, prompt, enc=enc)
        lat = {}
        multimask = use_multimask(self.settings, False, prompt.points.shape[0])
        low, iou, ptr, obj_score = self._decode(last["pix"], enc, prompt, multimask, lat,
                                                mask_input=self._current_logits(frame_idx))
        binarize = bool(self.settings["binarize_mask_from_pts_for_mem_enc"])
        maskmem = self._memory(enc, low, obj_score, binarize, lat)
        if self.correct_as_cond:
            self.bank.add_conditioning(frame_idx, maskmem, ptr)
        else:
            self.bank.add_frame(frame_idx, maskmem, last["idx"], ptr)
        self._done(frame_idx, enc, last["pix"], None if self.correct_as_cond else last["idx"], low)
        return ObjectStep(frame_idx, low, float(obj_score.reshape(-1)[0]), float(iou.reshape(-1)[0]),
                          self.T if self.correct_as_cond else int(last["idx"].size), lat)

    def track(self, frame_idx: int, image: np.ndarray | None, enc: dict | None = None,
              k: int | None = None) -> ObjectStep:
        """A tracked (non-conditioning) frame. runtime/batched.py runs the same three phases
        for several objects at once (router, decoder and memory encoder batched)."""
        lat = {}
        enc = self.encode(image, lat) if enc is None else enc
        plan = self.condition(frame_idx, enc, lat, k=k)
        low, iou, ptr, obj_score = self._decode(plan["pix"], enc, None, use_multimask(self.settings, False, 0), lat)
        maskmem = self._memory(enc, low, obj_score, False, lat)
        return self.finish_track(plan, enc, low, iou, ptr, obj_score, maskmem, lat)

    def needs_router(self, k: int | None = None) -> bool:
        k = self.k if k is None else int(k)
        return self.adaptive or k < self.T

    def condition(self, frame_idx: int, enc: dict, lat: dict, k: int | None = None,
                  scores: np.ndarray | None = None) -> dict:
        """A tracked frame up to the decoder: router, top-k, memory attention on the kept tokens,
        scatter back. `scores`: this object's router scores when a batched call computed them."""
        if not self.bank.cond:
            raise RuntimeError("track() before any prompted frame")
        feat = enc["feat"]
        C = feat.shape[1]
        tokens = feat.reshape(C, -1).T  # [T, C]
        k = self.k if k is None else int(k)
        budget = None
        if not self.needs_router(k):
            idx = np.arange(self.T, dtype=np.int64)
        else:
            if scores is None:
                scores = self._run("router", {"feat": feat, "text_emb": self.text_emb,
                                              "prev_mask_logits": self.prev_logits}, lat)["scores"]
            if self.adaptive:
                k = self.budget(scores.reshape(-1), tokens)
                budget = dict(self.budget.last)
            idx = top_k_tokens(scores, k)
        memory, memory_pos, memory_idx = self.bank.assemble(frame_idx, self.num_frames)
        cond = self._run("memory_attention", {
            "curr": np.ascontiguousarray(tokens[idx]), "curr_pos": self.constants["vision_pos"][idx],
            "curr_idx": idx, "memory": memory, "memory_pos": memory_pos,
            "memory_idx": memory_idx}, lat)["conditioned"]
        if idx.size == self.T:
            grid = cond
        else:
            base = tokens + self.no_mem if self.fill == "no_mem" or self.prev_grid is None else self.prev_grid
            grid = scatter_tokens(base, idx, cond)
        pix = np.ascontiguousarray(grid.T.reshape(1, C, self.G, self.G))
        return {"frame": frame_idx, "idx": idx, "grid": grid, "pix": pix, "budget": budget}

    def finish_track(self, plan: dict, enc: dict, low, iou, ptr, obj_score, maskmem, lat: dict) -> ObjectStep:
        """A tracked frame after the memory encoder: the bank, the fill state, the step."""
        frame_idx, idx = plan["frame"], plan["idx"]
        self.bank.add_frame(frame_idx, maskmem, idx, ptr)
        if self.fill == "last":
            self.prev_grid = plan["grid"]
        self._done(frame_idx, enc, plan["pix"], idx, low)
        return ObjectStep(frame_idx, low, float(obj_score.reshape(-1)[0]), float(iou.reshape(-1)[0]),
                          int(idx.size), lat, kept_idx=idx, budget=plan["budget"])
