"""The memory bank of one tracked object: preallocated, constant size over any video length and
any number of prompts.

What SAM2's `_prepare_memory_conditioned_features` reads, kept as SAM2 keeps it:
- conditioning frames (prompted frames): all T tokens, temporal slot 0. At most `max_cond` are
  attended to: SAM2's `max_cond_frames_in_attn`, which picks the temporally closest ones — in
  streaming order, the most recent. (SAM2's own default attends to every conditioning frame, so
  its memory grows with each prompt; a bounded bank is what a live session needs.)
- the last num_maskmem - 1 tracked frames: only the tokens the router kept (with their grid
  indices), in a ring; SAM2 picks frames t-6..t-1, oldest first;
- object pointers of the last max_obj_ptrs - 1 tracked frames, in a ring.
A conditioning frame that drops out of the closest `max_cond` is what SAM2 calls an unselected
conditioning output: it still serves as a past frame's memory and pointer while it is within
the ring's window, so it moves into the ring (all T tokens) instead of vanishing.
Memory features are stored as bfloat16 bits, as SAM2 stores them (`.to(torch.bfloat16)`).
"""

from __future__ import annotations

import numpy as np

from fastsam2.runtime.contract import PTR_TOKENS
from fastsam2.runtime.sam2_math import from_bf16_bits, sine_pe_1d, to_bf16_bits

DEFAULT_MAX_COND = 4
# the most conditioning frames a session may attend to: each one is T tokens of memory attention
# and of the preallocated assembly buffers (a client's 10**6 once made numpy reserve 62 GiB)
MAX_COND_FRAMES = 64


class Revision:
    """A session's change counter, shared by its objects' trackers and banks: every write
    records the revision it happened at, so a snapshot increment carries exactly what changed
    after a given revision (runtime/snapshot.py)."""

    __slots__ = ("now",)

    def __init__(self, now: int = 0):
        self.now = now


class MemoryBank:
    def __init__(self, num_tokens: int, settings: dict, constants: dict, max_cond: int = DEFAULT_MAX_COND,
                 clock: Revision | None = None):
        if not 1 <= max_cond <= MAX_COND_FRAMES:
            raise ValueError(f"max_cond must be in 1..{MAX_COND_FRAMES}, got {max_cond}")
        self.T = num_tokens
        self.settings = settings
        self.constants = constants
        self.num_maskmem = settings["num_maskmem"]
        self.mem_dim = settings["mem_dim"]
        self.hidden = settings["hidden_dim"]
        slots = self.num_maskmem - 1
        self.feat = np.zeros((slots, num_tokens, self.mem_dim), np.uint16)
        self.idx = np.zeros((slots, num_tokens), np.int64)
        self.count = np.zeros(slots, np.int64)
        self.frame = np.full(slots, -1, np.int64)
        ptr_slots = max(settings["max_obj_ptrs_in_encoder"] - 1, 1)
        self.ptr = np.zeros((ptr_slots, self.hidden), np.float32)
        self.ptr_frame = np.full(ptr_slots, -1, np.int64)
        self.cond = []  # (frame, bf16 feat [T, mem_dim], obj_ptr [hidden]), in the order added
        self.max_cond = max_cond
        # the revision of each ring slot's, pointer slot's and the conditioning list's last write
        self.clock = clock or Revision()
        self.slot_rev = np.zeros(slots, np.int64)
        self.ptr_rev = np.zeros(ptr_slots, np.int64)
        self.cond_rev = self.clock.now
        # assembly buffers, sized for the fullest bank
        max_m = max_cond * num_tokens + slots * num_tokens + (ptr_slots + max_cond) * PTR_TOKENS
        self._mem = np.zeros((max_m, self.mem_dim), np.float32)
        self._pos = np.zeros((max_m, self.mem_dim), np.float32)
        self._midx = np.zeros(max_cond * num_tokens + slots * num_tokens, np.int64)
        self._all = np.arange(num_tokens, dtype=np.int64)

    # -- writing -----------------------------------------------------------------------------
    def add_conditioning(self, frame_idx: int, maskmem: np.ndarray, obj_ptr: np.ndarray) -> None:
        """maskmem [1, mem_dim, G, G] of a prompted frame: all tokens are kept.

        A frame that was tracked before becomes a conditioning frame: its tracked entry goes
        (SAM2's preflight pops it from the non-conditioning outputs); a frame prompted again
        replaces its entry.
        """
        tokens = maskmem.reshape(self.mem_dim, -1).T
        entry = (frame_idx, to_bf16_bits(tokens), obj_ptr.reshape(-1).astype(np.float32))
        self.cond_rev = self.clock.now
        self.drop_tracked(frame_idx)
        for i, (f, _, _) in enumerate(self.cond):
            if f == frame_idx:
                self.cond[i] = entry
                return
        self.cond.append(entry)
        if len(self.cond) > self.max_cond:
            oldest = min(range(len(self.cond)), key=lambda i: self.cond[i][0])
            self._unselect(*self.cond.pop(oldest))

    def _unselect(self, frame_idx: int, feat_bits: np.ndarray, obj_ptr: np.ndarray) -> None:
        """A conditioning frame past the closest max_cond: keep it as a past frame's memory
        and pointer where its ring slots do not already hold a newer frame."""
        slot = frame_idx % len(self.frame)
        if self.frame[slot] < frame_idx:
            self.feat[slot] = feat_bits
            self.idx[slot] = self._all
            self.count[slot] = self.T
            self.frame[slot] = frame_idx
            self.slot_rev[slot] = self.clock.now
        p = frame_idx % len(self.ptr_frame)
        if self.ptr_frame[p] < frame_idx:
            self.ptr[p] = obj_ptr
            self.ptr_frame[p] = frame_idx
            self.ptr_rev[p] = self.clock.now

    def add_frame(self, frame_idx: int, maskmem: np.ndarray, kept_idx: np.ndarray,
                  obj_ptr: np.ndarray) -> None:
        """A tracked frame: store only its kept tokens (all of them at keep 1.0)."""
        slot = frame_idx % len(self.frame)
        n = kept_idx.size
        tokens = maskmem.reshape(self.mem_dim, -1).T
        self.feat[slot, :n] = to_bf16_bits(tokens[kept_idx])
        self.idx[slot, :n] = kept_idx
        self.count[slot] = n
        self.frame[slot] = frame_idx
        self.slot_rev[slot] = self.clock.now
        p = frame_idx % len(self.ptr_frame)
        self.ptr[p] = obj_ptr.reshape(-1)
        self.ptr_frame[p] = frame_idx
        self.ptr_rev[p] = self.clock.now

    def drop_tracked(self, frame_idx: int) -> None:
        """Forget a tracked frame's memory and pointer (it became a conditioning frame)."""
        slot = frame_idx % len(self.frame)
        if self.frame[slot] == frame_idx:
            self.frame[slot] = -1
            self.count[slot] = 0
            self.slot_rev[slot] = self.clock.now
        p = frame_idx % len(self.ptr_frame)
        if self.ptr_frame[p] == frame_idx:
            self.ptr_frame[p] = -1
            self.ptr_rev[p] = self.clock.now

    def stored_tokens(self) -> int:
        """Spatial tokens held for tracked frames (what pruning saves)."""
        return int(self.count[self.frame >= 0].sum())

    def nbytes(self) -> int:
        """Bytes the bank holds (preallocated ring + conditioning frames)."""
        cond = sum(f.nbytes + p.nbytes for _, f, p in self.cond)
        return int(self.feat.nbytes + self.idx.nbytes + self.ptr.nbytes + cond
                   + self._mem.nbytes + self._pos.nbytes + self._midx.nbytes)

    # -- reading -----------------------------------------------------------------------------
    def _frame_slot(self, f: int):
        slot = f % len(self.frame)
        return slot if f >= 0 and self.frame[slot] == f else None

    def assemble(self, frame_idx: int, num_frames: int | None):
        """memory [M, mem_dim], memory_pos [M, mem_dim], memory_idx [Ms] for frame_idx.

        Views into preallocated buffers: valid until the next call.
        """
        s, c = self.settings, self.constants
        tpos = c["maskmem_tpos_enc"]  # [num_maskmem, mem_dim]
        pos_table = c["maskmem_pos"]  # [T, mem_dim]
        m = 0
        ms = 0
        for _, feat, _ in self.cond:  # t_pos = 0
            n = feat.shape[0]
            from_bf16_bits(feat, self._mem[m:m + n])
            self._pos[m:m + n] = pos_table + tpos[self.num_maskmem - 1]
            self._midx[ms:ms + n] = self._all
            m += n
            ms += n
        stride = s.get("memory_temporal_stride_for_eval", 1)
        for t_pos in range(1, self.num_maskmem):
            t_rel = self.num_maskmem - t_pos
            if t_rel == 1:
                prev = frame_idx - 1
            else:
                prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
            slot = self._frame_slot(prev)
            if slot is None:
                continue
            n = int(self.count[slot])
            idx = self.idx[slot, :n]
            from_bf16_bits(self.feat[slot, :n], self._mem[m:m + n])
            self._pos[m:m + n] = pos_table[idx] + tpos[self.num_maskmem - t_pos - 1]
            self._midx[ms:ms + n] = idx
            m += n
            ms += n
        m = self._add_pointers(frame_idx, num_frames, m)
        return self._mem[:m], self._pos[:m], self._midx[:ms]

    def _add_pointers(self, frame_idx: int, num_frames: int | None, m: int) -> int:
        s, c = self.settings, self.constants
        if not s["use_obj_ptrs_in_encoder"]:
            return m
        limit = s["max_obj_ptrs_in_encoder"] if num_frames is None else min(num_frames, s["max_obj_ptrs_in_encoder"])
        pos, ptrs = [], []
        for f, _, ptr in self.cond:
            if s["only_obj_ptrs_in_the_past_for_eval"] and f > frame_idx:
                continue
            pos.append(frame_idx - f if s["use_signed_tpos_enc_to_obj_ptrs"] else abs(frame_idx - f))
            ptrs.append(ptr)
        for t_diff in range(1, limit):
            f = frame_idx - t_diff
            if f < 0 or (num_frames is not None and f >= num_frames):
                break
            p = f % len(self.ptr_frame)
            if self.ptr_frame[p] == f:
                pos.append(t_diff)
                ptrs.append(self.ptr[p])
        if not ptrs:
            return m
        n = len(ptrs)
        if s["add_tpos_enc_to_obj_ptrs"]:
            t_diff_max = max(limit - 1, 1)
            tpos_dim = self.hidden if s["proj_tpos_enc_in_obj_ptrs"] else self.mem_dim
            pe = sine_pe_1d(np.asarray(pos, np.float32) / np.float32(t_diff_max), tpos_dim)
            if s["proj_tpos_enc_in_obj_ptrs"]:
                pe = pe @ c["obj_ptr_tpos_w"].T + c["obj_ptr_tpos_b"]
        else:
            pe = np.zeros((n, self.mem_dim), np.float32)
        split = self.hidden // self.mem_dim
        # a pointer of `hidden` channels becomes `split` consecutive tokens of mem_dim
        self._mem[m:m + n * split] = np.stack(ptrs).reshape(n * split, self.mem_dim)
        self._pos[m:m + n * split] = np.repeat(pe, split, axis=0)
        return m + n * split
