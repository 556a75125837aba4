"""Several objects' tracked frames in one call per graph: the router, the mask decoder and the
memory encoder take a frame's objects as their batch (the contract's axis B), as SAM2's video
predictor batches its objects in propagate_in_video. Memory attention stays one call per object:
each object has its own kept tokens and memory length, and its graph has no batch axis.

The image features are computed once per frame and broadcast inside the graphs (B = 1 there),
so a batch costs no copies of them. Tracked frames feed every object the same prompt shape (one
padding point, no mask input), which is what makes the decoder batchable without padding.
Results equal the per-object path within float32 rounding (tests/runtime/test_batched.py).
"""

from __future__ import annotations

import time

import numpy as np

from fastsam2.runtime.contract import MAX_BATCH
from fastsam2.runtime.sam2_math import select_mask, use_multimask

BATCHED_GRAPHS = ("router", "mask_decoder", "memory_encoder")


def bundle_batchable(manifest: dict) -> bool:
    """Whether a bundle's graphs take a batch of objects (exported with the B axis; bundles
    from before it have a fixed batch of 1 and run their objects one by one)."""
    graphs = manifest.get("graphs", {})
    return all(
        all(not t["shape"] or t["shape"][0] == "B" for t in graphs.get(g, {}).get("outputs", [{"shape": [1]}]))
        for g in BATCHED_GRAPHS)


def _timed(sessions, name: str, feeds: dict, lats: list) -> dict:
    """One graph call for len(lats) objects: its time is shared equally among their latencies."""
    t0 = time.perf_counter()
    out = sessions[name].run(feeds)
    share = (time.perf_counter() - t0) * 1e3 / len(lats)
    for lat in lats:
        lat[name] = lat.get(name, 0.0) + share
    return out


def track_together(trackers: list, frames: list, enc: dict) -> list:
    """Tracked frames of several objects on one image: trackers[i] at its own frame index
    frames[i]. Returns their ObjectSteps in the same order."""
    steps = []
    for at in range(0, len(trackers), MAX_BATCH):
        steps += _track_batch(trackers[at:at + MAX_BATCH], frames[at:at + MAX_BATCH], enc)
    return steps


def _track_batch(trackers: list, frames: list, enc: dict) -> list:
    first = trackers[0]
    sessions, settings = first.sessions, first.settings
    lats = [{} for _ in trackers]
    routed = [i for i, tr in enumerate(trackers) if tr.needs_router()]
    scores = {}
    if routed:
        out = _timed(sessions, "router", {
            "feat": enc["feat"],
            "text_emb": np.concatenate([trackers[i].text_emb for i in routed]),
            "prev_mask_logits": np.concatenate([trackers[i].prev_logits for i in routed])},
            [lats[i] for i in routed])
        scores = {i: out["scores"][j:j + 1] for j, i in enumerate(routed)}
    plans = [tr.condition(f, enc, lats[i], scores=scores.get(i)) for i, (tr, f) in enumerate(zip(trackers, frames))]

    dec = _timed(sessions, "mask_decoder", first.decoder_feeds(np.concatenate([p["pix"] for p in plans]), enc), lats)
    multimask = use_multimask(settings, False, 0)
    picked = []
    for i, tr in enumerate(trackers):
        one = slice(i, i + 1)
        low, iou, ptr = select_mask(settings, dec["masks"][one], dec["iou"][one], dec["obj_ptrs"][one],
                                    dec["object_score"][one], multimask, tr.constants["no_obj_ptr"])
        picked.append((low, iou, ptr, dec["object_score"][one]))

    mem = _timed(sessions, "memory_encoder", first.memory_feeds(
        enc, np.concatenate([p[0] for p in picked]), np.concatenate([p[3] for p in picked]), False), lats)["maskmem"]
    return [tr.finish_track(plans[i], enc, *picked[i], mem[i:i + 1], lats[i]) for i, tr in enumerate(trackers)]
