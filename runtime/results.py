"""What a session returns per frame: each object's mask, logits and numbers, and the composed
index mask. Shared by the local session and a remote one (the Triton client), so both give the
same masks from the same logits. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .outputs import finite_or_none
from .sam2_math import Resizer, compose_objects, mask_area_bbox


@dataclass
class ObjectResult:
    obj_id: int
    mask: np.ndarray  # bool H x W at input resolution (logits > 0)
    logits: np.ndarray  # float32 [S/4, S/4]: SAM2's low-res pred_masks, before resizing
    object_score: float
    iou: float
    area: int
    bbox: list | None  # [x0, y0, x1, y1] inclusive, input pixels
    kept_tokens: int
    prompted: bool  # a prompt was applied to this object on this frame
    budget: dict | None = None  # --keep auto: what set this frame's token budget

    def to_json(self) -> dict:
        # strict JSON: a non-finite score (a broken graph, a hostile bundle) is written as null;
        # `prompted` is on every entry (false when no prompt was applied), as the README lists it
        return {"object_score": finite_or_none(self.object_score, 4), "iou": finite_or_none(self.iou, 4),
                "mask_area": self.area, "bbox": self.bbox, "kept_tokens": self.kept_tokens,
                "prompted": bool(self.prompted),
                **({"budget": self.budget} if self.budget else {})}


@dataclass
class FrameResult:
    frame: int  # session frame index: 0 = the first frame pushed
    timestamp: float | None
    objects: dict  # {obj_id: ObjectResult}, ids ascending
    index_mask: np.ndarray  # uint8 H x W: each pixel's object id (highest positive logit), 0 = none
    latency_ms: dict  # per graph, the shared image encoder counted once
    frame_ms: float

    def to_json(self) -> dict:
        """JSON-ready numbers of this frame (results.json's per-frame entry)."""
        rec = {"frame": self.frame}
        if self.timestamp is not None:
            rec["timestamp"] = round(float(self.timestamp), 4)
        rec["objects"] = {str(o): r.to_json() for o, r in self.objects.items()}
        rec["latency_ms"] = {k: round(v, 2) for k, v in self.latency_ms.items()}
        rec["frame_ms"] = round(self.frame_ms, 2)
        return rec


def frame_result(frame: int, timestamp, steps: dict, shape: tuple, latency_ms: dict, frame_ms: float,
                 resize: Resizer | None = None) -> FrameResult:
    """A frame's FrameResult from each object's low-res logits and numbers (ObjectStep-like:
    low_res_logits [1,1,S/4,S/4], object_score, iou, kept_tokens, prompted): masks at the
    input resolution, areas, boxes and the composed index mask. Shared by the local session and
    a remote one (the Triton client), so both give the same masks from the same logits."""
    resize = resize or Resizer()
    h, w = shape
    ids = sorted(steps)
    objects, logits = {}, []
    for o in ids:
        step = steps[o]
        low = np.asarray(step.low_res_logits, np.float32).reshape(step.low_res_logits.shape[-2:])
        full = resize(low, (h, w))
        logits.append(full)
        mask = full > 0
        area, bbox = mask_area_bbox(mask)
        objects[o] = ObjectResult(o, mask, low, float(step.object_score), float(step.iou), area, bbox,
                                  int(step.kept_tokens), bool(step.prompted), getattr(step, "budget", None))
    index = compose_objects(np.stack(logits), ids) if ids else np.zeros((h, w), np.uint8)
    return FrameResult(frame, timestamp, objects, index, dict(latency_ms), frame_ms)


def add_latency(total: dict, part: dict) -> None:
    for k, v in part.items():
        if k != "image_encoder":  # the shared encoder is timed once, by the session
            total[k] = total.get(k, 0.0) + v
