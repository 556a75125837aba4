"""An independent reference for keep < 1: SAM2VideoPredictor's own loop, with its
`_prepare_memory_conditioned_features` replaced by a pruned one built from SAM2's own parts.

At keep 1.0 the official predictor is the reference (tests/runtime/test_session_parity.py);
below 1.0 nothing official exists, and bugs that only show when tokens are pruned (a wrong
top-k, a lost prior, gathers and scatters at the wrong tokens, a bank holding the wrong kept
tokens) would pass every keep-1.0 test. Here SAM2 runs as usual except that on each tracked
frame:
- the kept tokens are chosen by the test itself (router_oracle.RouterTopK): the k highest
  scores of the PyTorch router run on SAM2's own features and SAM2's previous logits, never
  the indices our tracker chose (those are only compared with it, and consulted on a tie);
- the current frame's queries are only its kept tokens, with their own vision_pos rows and the
  RoPE of their own grid positions;
- memory holds each conditioning frame whole and each past tracked frame restricted at read
  time to the tokens kept on THAT frame (SAM2 stores the full maskmem), with SAM2's temporal
  encodings and SAM2's object pointers;
- attention runs through SAM2's MemoryAttention layers' own submodules (norms, projections,
  MLP) and SAM2's complex RoPE (`compute_axial_cis`, `apply_rotary_enc`) indexed by grid
  position; object-pointer tokens get none (`num_k_exclude_rope`);
- the decoder gets the conditioned tokens scattered back and `feat + no_mem_embed` elsewhere.
Nothing of fastsam2.export.graphs but the router module is used, so the other graphs stay what
is under test.

`pruned_reference_check` runs both and compares the logits and the kept sets (plus the prior:
tokens in/near the previous mask are always kept); the mutation test
(tests/runtime/test_mutations.py) calls it to see that each known pruned-path bug is caught.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

from router_oracle import Recorder, RouterTopK, k_for

# -- the pruned memory conditioning, from SAM2's parts ------------------------------------------


def _rope_attention(attn, q, k, v, q_grid, k_grid, num_k_exclude_rope: int, grid: int):
    """sam2 RoPEAttention.forward with the rotation of each token taken at its grid position
    (SAM2 takes it at the token's place in the sequence, which is the grid only for full maps)."""
    import torch
    import torch.nn.functional as F
    from sam2.modeling.position_encoding import apply_rotary_enc

    q = attn._separate_heads(attn.q_proj(q), attn.num_heads)  # [B, heads, L, c]
    k = attn._separate_heads(attn.k_proj(k), attn.num_heads)
    v = attn._separate_heads(attn.v_proj(v), attn.num_heads)
    cis = attn.compute_cis(end_x=grid, end_y=grid)  # [grid*grid, c/2] complex, SAM2's own
    n = k.shape[-2] - num_k_exclude_rope
    assert n == k_grid.numel(), (n, k_grid.numel())
    # apply_rotary_enc rotates q and k with one table; with no keys (length 0) it leaves k alone
    q, _ = apply_rotary_enc(q, q[:, :, :0], freqs_cis=cis[q_grid])
    k_rot, _ = apply_rotary_enc(k[:, :, :n], k[:, :, :0], freqs_cis=cis[k_grid])
    k = torch.cat([k_rot, k[:, :, n:]], dim=2)
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.out_proj(attn._recombine_heads(out))


def pruned_memory_attention(ma, curr, curr_pos, q_grid, memory, memory_pos, k_grid,
                            num_obj_ptr_tokens: int, grid: int):
    """sam2 MemoryAttention.forward (seq-first [L, B, C] in and out) with RoPE by grid index."""
    out = curr + 0.1 * curr_pos if ma.pos_enc_at_input else curr
    if ma.batch_first:
        out, curr_pos = out.transpose(0, 1), curr_pos.transpose(0, 1)
        memory, memory_pos = memory.transpose(0, 1), memory_pos.transpose(0, 1)
    for layer in ma.layers:  # MemoryAttentionLayer: _forward_sa, _forward_ca, MLP
        t2 = layer.norm1(out)
        qk = t2 + curr_pos if layer.pos_enc_at_attn else t2
        out = out + layer.dropout1(_rope_attention(layer.self_attn, qk, qk, t2, q_grid, q_grid, 0, grid))
        t2 = layer.norm2(out)
        t2 = _rope_attention(layer.cross_attn_image,
                             t2 + curr_pos if layer.pos_enc_at_cross_attn_queries else t2,
                             memory + memory_pos if layer.pos_enc_at_cross_attn_keys else memory,
                             memory, q_grid, k_grid, num_obj_ptr_tokens, grid)
        out = out + layer.dropout2(t2)
        t2 = layer.norm3(out)
        out = out + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(t2)))))
    out = ma.norm(out)
    return out.transpose(0, 1) if ma.batch_first else out


def _memory(self, frame_idx, kept, output_dict, num_frames, B, C, device):
    """SAM2's memory for frame_idx (the selection code of _prepare_memory_conditioned_features,
    forward in time, eval), each tracked frame's maskmem restricted to the tokens it kept.

    Returns memory [M, B, mem_dim], memory_pos, the grid index of each spatial token, and the
    number of object-pointer tokens at the end.
    """
    import torch
    from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames

    cond_outputs = output_dict["cond_frame_outputs"]
    assert len(cond_outputs) > 0
    selected, unselected = select_closest_cond_frames(frame_idx, cond_outputs, self.max_cond_frames_in_attn)
    entries = [(0, None, out) for out in selected.values()]  # (t_pos, kept indices or None, out)
    stride = self.memory_temporal_stride_for_eval
    for t_pos in range(1, self.num_maskmem):
        t_rel = self.num_maskmem - t_pos
        if t_rel == 1:
            prev = frame_idx - t_rel
        else:
            prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
        out = output_dict["non_cond_frame_outputs"].get(prev, None)
        if out is not None:
            entries.append((t_pos, kept[prev], out))  # a tracked frame: only what it kept
        else:
            entries.append((t_pos, None, unselected.get(prev, None)))  # whole, as our bank
    mem, pos, grid_idx = [], [], []
    for t_pos, idx, prev in entries:
        if prev is None:
            continue
        feats = prev["maskmem_features"].to(device).flatten(2).permute(2, 0, 1).float()  # bf16 stored
        enc = prev["maskmem_pos_enc"][-1].to(device).flatten(2).permute(2, 0, 1)
        enc = enc + self.maskmem_tpos_enc[self.num_maskmem - t_pos - 1]
        rows = (torch.arange(feats.shape[0]) if idx is None
                else torch.as_tensor(np.asarray(idx), dtype=torch.long))
        mem.append(feats[rows])
        pos.append(enc[rows])
        grid_idx.append(rows)

    num_ptr = 0
    if self.use_obj_ptrs_in_encoder:  # exactly SAM2's pointers
        max_ptrs = min(num_frames, self.max_obj_ptrs_in_encoder)
        ptr_cond = ({t: o for t, o in selected.items() if t <= frame_idx}
                    if self.only_obj_ptrs_in_the_past_for_eval else selected)
        pos_and_ptrs = [((frame_idx - t) if self.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t),
                         o["obj_ptr"]) for t, o in ptr_cond.items()]
        for t_diff in range(1, max_ptrs):
            t = frame_idx - t_diff
            if t < 0 or (num_frames is not None and t >= num_frames):
                break
            o = output_dict["non_cond_frame_outputs"].get(t, unselected.get(t, None))
            if o is not None:
                pos_and_ptrs.append((t_diff, o["obj_ptr"]))
        if pos_and_ptrs:
            pos_list, ptrs_list = zip(*pos_and_ptrs)
            obj_ptrs = torch.stack(ptrs_list, dim=0)
            if self.add_tpos_enc_to_obj_ptrs:
                tpos_dim = C if self.proj_tpos_enc_in_obj_ptrs else self.mem_dim
                obj_pos = get_1d_sine_pe(torch.tensor(pos_list).to(device) / (max_ptrs - 1), dim=tpos_dim)
                obj_pos = self.obj_ptr_tpos_proj(obj_pos).unsqueeze(1).expand(-1, B, self.mem_dim)
            else:
                obj_pos = obj_ptrs.new_zeros(len(pos_list), B, self.mem_dim)
            if self.mem_dim < C:
                obj_ptrs = obj_ptrs.reshape(-1, B, C // self.mem_dim, self.mem_dim)
                obj_ptrs = obj_ptrs.permute(0, 2, 1, 3).flatten(0, 1)
                obj_pos = obj_pos.repeat_interleave(C // self.mem_dim, dim=0)
            mem.append(obj_ptrs)
            pos.append(obj_pos)
            num_ptr = obj_ptrs.shape[0]
    return torch.cat(mem, 0), torch.cat(pos, 0), torch.cat(grid_idx), num_ptr


def make_pruned_prepare(model, select, original):
    """A drop-in for model._prepare_memory_conditioned_features whose tracked frames keep
    `select(frame, feat [1, C, G, G], SAM2's previous low-res logits [1, 1, 4G, 4G])` (grid
    indices); each past tracked frame's memory is read at the tokens it kept."""
    import torch

    chosen = {}

    def prepare(frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
                feat_sizes, output_dict, num_frames, track_in_reverse=False):
        if is_init_cond_frame:  # feat + no_mem_embed, SAM2's own path
            return original(frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
                            feat_sizes, output_dict, num_frames, track_in_reverse)
        assert not track_in_reverse and not model.training
        feats = current_vision_feats[-1]  # [HW, B, C]
        B, C = feats.size(1), model.hidden_dim
        H, W = feat_sizes[-1]
        assert H == W, feat_sizes
        prev = {**output_dict["non_cond_frame_outputs"], **output_dict["cond_frame_outputs"]}[frame_idx - 1]
        chosen[frame_idx] = np.asarray(select(frame_idx, feats.permute(1, 2, 0).reshape(B, C, H, W),
                                              prev["pred_masks"]))
        q_grid = torch.as_tensor(chosen[frame_idx], dtype=torch.long)
        memory, memory_pos, k_grid, num_ptr = _memory(model, frame_idx, chosen, output_dict, num_frames,
                                                      B, C, feats.device)
        cond = pruned_memory_attention(model.memory_attention, feats[q_grid],
                                       current_vision_pos_embeds[-1][q_grid], q_grid, memory, memory_pos,
                                       k_grid, num_ptr, H)
        grid = feats + model.no_mem_embed  # pruned positions: SAM2's "no memory" features
        grid[q_grid] = cond
        return grid.permute(1, 2, 0).reshape(B, C, H, W)

    return prepare


# -- the image encoder, computed once per frame and model --------------------------------------
# Both sides run the same encoder (SAM2's forward_image; our image_encoder graph module), and
# nothing in the pruned path touches it (the keep-1.0 parity tests hold it), so a check re-run
# under several mutations computes it once per frame. Keyed weakly by the module, then by the
# image's bytes: a mutation of the encoder itself needs cache_encoder=False.

_ENCODER_CACHE = weakref.WeakKeyDictionary()


def _image_key(array) -> tuple:
    return tuple(array.shape), hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _cached_forward_image(pred):
    """pred.forward_image memoised (SAM2 itself caches only the last frame)."""
    original = pred.forward_image
    cache = _ENCODER_CACHE.setdefault(pred, {})

    def forward_image(img):
        key = _image_key(img.detach().cpu().numpy())
        if key not in cache:
            cache[key] = original(img)
        return {k: (list(v) if isinstance(v, list) else v) for k, v in cache[key].items()}

    return forward_image


class _MemoEncoder:
    """Our image_encoder session (a TorchSession) memoised on its module."""

    def __init__(self, inner):
        self.inner = inner
        self.cache = _ENCODER_CACHE.setdefault(inner.module, {})

    def run(self, feeds):
        key = _image_key(feeds["image"])
        if key not in self.cache:
            self.cache[key] = self.inner.run(feeds)
        return {k: v.copy() for k, v in self.cache[key].items()}


# -- the two runs --------------------------------------------------------------------------------


def _predictor(model):
    return getattr(model, "model", model)  # LoadedSAM2 or SAM2VideoPredictor


def run_reference(model, frames_dir, point, kept, obj_id: int = 1, cache_encoder: bool = True) -> dict:
    """{frame: SAM2's low-res logits [S/4, S/4]} of SAM2VideoPredictor with one positive click
    on frame 0 and the pruned memory conditioning keeping `kept` ({frame: grid indices}, or a
    selector called as make_pruned_prepare's `select`, e.g. router_oracle.RouterTopK); with
    kept=None, SAM2 unchanged."""
    import torch

    pred = _predictor(model)
    patched = {}
    if kept is not None:
        patched["_prepare_memory_conditioned_features"] = make_pruned_prepare(
            pred, kept if callable(kept) else (lambda f, *_: kept[f]), pred._prepare_memory_conditioned_features)
    if cache_encoder:
        patched["forward_image"] = _cached_forward_image(pred)
    saved = {name: pred.__dict__[name] for name in patched if name in pred.__dict__}
    for name, fn in patched.items():
        setattr(pred, name, fn)  # instance attributes shadow the methods
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            state = pred.init_state(str(frames_dir))
            pred.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, points=np.array([point], np.float32),
                                       labels=np.array([1], np.int32))
            for _ in pred.propagate_in_video(state):
                pass
            outs = state["output_dict_per_obj"][0]
            low = {**outs["non_cond_frame_outputs"], **outs["cond_frame_outputs"]}
            return {f: o["pred_masks"][0, 0].float().numpy().copy() for f, o in sorted(low.items())}
    finally:
        for name in patched:
            del pred.__dict__[name]
        pred.__dict__.update(saved)


def frame_paths(frames_dir) -> list:
    return sorted(p for p in Path(frames_dir).iterdir() if p.suffix == ".jpg")


def run_ours(session, frames_dir, point, obj_id: int = 1):
    """Our tracker through a fastsam2 Session (one positive click on frame 0): ({frame: low-res
    logits}, {frame: grid indices that entered memory attention}, {frame: the router's feeds
    text_emb and its scores})."""
    recs = {"memory_attention": Recorder(session.sessions["memory_attention"], feeds=("curr_idx",)),
            "router": Recorder(session.sessions["router"], feeds=("text_emb",), outputs=("scores",))}
    inner = {name: session.sessions[name] for name in recs}
    session.sessions.update(recs)
    try:
        logits = {}
        for t, p in enumerate(frame_paths(frames_dir)):
            if t == 0:
                session.add_prompt(obj_id, frame=0, points=[point])
            for r in recs.values():
                r.frame = t
            res = session.push(np.asarray(Image.open(p).convert("RGB")))
            logits[t] = np.array(res.objects[obj_id].logits, np.float32)
    finally:
        session.sessions.update(inner)
    kept = {f: g["curr_idx"].astype(np.int64) for f, g in recs["memory_attention"].got.items()}
    return logits, kept, recs["router"].got


def compare(ref: dict, ours: dict) -> tuple:
    """(max-abs logits difference, min IoU of logits > 0) over every frame."""
    assert sorted(ref) == sorted(ours), (sorted(ref), sorted(ours))
    worst, min_iou = 0.0, 1.0
    for f in ref:
        a, b = ref[f], ours[f]
        assert a.shape == b.shape, (f, a.shape, b.shape)
        worst = max(worst, float(np.abs(a - b).max()))
        union = np.logical_or(a > 0, b > 0).sum()
        min_iou = min(min_iou, 1.0 if union == 0 else float(np.logical_and(a > 0, b > 0).sum() / union))
    return worst, min_iou


def torch_session(pruned, keep, num_frames, sessions=None, cache_encoder=True):
    """A fastsam2 Session over graph sessions (default: the PyTorch modules of `pruned`)."""
    from fastsam2.export.torch_backend import torch_sessions
    from fastsam2.runtime.session import Session

    sessions = dict(sessions or torch_sessions(pruned))
    if cache_encoder and hasattr(sessions["image_encoder"], "module"):
        sessions["image_encoder"] = _MemoEncoder(sessions["image_encoder"])
    return Session(sessions, pruned.constants(), pruned.settings, keep=keep, num_frames=num_frames)


# the reference's router runs on SAM2's features and logits, ours on our graphs': measured up to
# 3e-4 apart at scores ~1e3 (5 float32 steps; every token a prior token) on the test model.
# Scores this close to the k-th one (relative: 1e-3 at 1e3) count as tied with it
TIE_TOL = 1e-6


def pruned_reference(pruned, tiny_sam2, frames_dir, point, keep, prefer: dict | None = None,
                     cache_encoder: bool = True) -> dict:
    """SAM2 with the pruned step, keeping on each tracked frame the top-k of the PyTorch router's
    scores (router_oracle.RouterTopK: SAM2's own features and previous logits, no text, the
    test's own k): {"ref": {frame: low-res logits}, "oracle": the RouterTopK}. `prefer` (our
    kept sets) settles ties at the k-th score only; without a tie (oracle.ties empty) the result
    does not depend on our tracker at all, so it may be reused across runs of ours."""
    T = pruned.geometry["T"]
    text = np.zeros((1, int(pruned.settings["text_dim"])), np.float32)
    oracle = RouterTopK(pruned.router, k_for(keep, T), text, tol=TIE_TOL, prefer=prefer)
    ref = run_reference(tiny_sam2, frames_dir, point, oracle, cache_encoder=cache_encoder)
    return {"ref": ref, "oracle": oracle}


def pruned_reference_check(pruned, tiny_sam2, frames_dir, point, keep, sessions=None, session=None,
                           cache_encoder: bool = True, details: dict | None = None,
                           reference: dict | None = None, caught_above: float | None = None) -> tuple:
    """Our tracker at `keep` vs SAM2 run with the pruned step on the router's top-k:
    (max-abs logits, min IoU, oracle violations) over every frame of `frames_dir`, one positive
    click `point` (input pixels) on frame 0. The violations (router_oracle.RouterTopK.violations)
    say where our kept set is not the top-k of the router's scores or drops prior tokens.

    sessions: graph sessions for our side (default: the PyTorch graph modules of `pruned`);
    session: a ready fastsam2 Session instead (e.g. ONNX Runtime on a bundle);
    cache_encoder: memoise both sides' image encoders per module and frame (see above);
    details, if given, receives both runs' logits, our kept indices and the reference;
    reference: a `pruned_reference` computed before, reused where our kept sets settle its ties
    as they were settled (it would be computed again exactly as it was). Where they settle one
    otherwise, the frames before it still hold: if they already differ by more than
    `caught_above` (or break the oracle), that is the answer; else the reference is recomputed.
    """
    n = len(frame_paths(frames_dir))
    s = session if session is not None else torch_session(pruned, keep, n, sessions, cache_encoder)
    ours, kept, router = run_ours(s, frames_dir, point)
    assert sorted(kept) == list(range(1, n)), sorted(kept)
    assert all(not g["text_emb"].any() for g in router.values()), "the reference's router gets no text"
    scores = {f: g["scores"] for f, g in router.items()}
    if details is not None:
        details.update(ours=ours, kept=kept, reused=False)
    if reference is not None:
        upto = reference["oracle"].divergence(kept)
        if upto is not None and caught_above is not None:
            head = [f for f in ours if f < upto]
            worst, iou = compare({f: reference["ref"][f] for f in head}, {f: ours[f] for f in head})
            violations = reference["oracle"].violations(kept, scores, before=upto)
            if worst > caught_above or violations:
                if details is not None:
                    details.update(reused=f"frames < {upto}")
                return worst, iou, violations
        if upto is not None:
            reference = None
        elif details is not None:
            details.update(reused=True)
    if reference is None:
        reference = pruned_reference(pruned, tiny_sam2, frames_dir, point, keep, prefer=kept,
                                     cache_encoder=cache_encoder)
    oracle = reference["oracle"]
    assert sorted(oracle.kept) == list(range(1, n)), sorted(oracle.kept)
    if details is not None:
        details.update(ref=reference["ref"], reference=reference)
    return compare(reference["ref"], ours) + (oracle.violations(kept, scores),)
