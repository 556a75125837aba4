"""The streaming session: one stream, any number of objects, prompts on any frame.

Every caller tracks through this one loop: `fastsam2-run` (files, folders, cameras, URLs), the
DAVIS evaluation, the Triton tracker model. Torch-free.

    with Session.open("bundle/", keep=0.5) as s:
        s.add_prompt(1, points=[(150, 180)])            # object 1, clicked on the first frame
        for rgb in frames:                              # uint8 H x W x 3, one size per session
            r = s.push(rgb)                             # r.objects[1].mask, .bbox, .object_score
            if r.frame == 30:
                r = s.add_prompt(1, frame=30, points=[(230, 210)])  # correct what was just seen
                s.add_prompt(2, box=(10, 10, 80, 90))   # a new object from the next frame on
            if r.frame == 60:
                s.remove(2)                             # its memory bank is freed

Semantics (SAM2VideoPredictor driven in streaming order; each object has its own memory bank
and its own time axis starting at its first prompt, as if SAM2 ran on the video from there):
- a prompt for a frame not yet pushed is applied when that frame arrives: the frame is an
  initial conditioning frame of the object (SAM2's add_new_points_or_box on a frame it has not
  tracked: the clicks alone, no memory), then tracking goes on from it. Several prompts for
  the same object and frame are merged into one (one call with all the points).
- a prompt on the frame just pushed corrects it: for an object tracked on that frame, SAM2's
  correction (memory-conditioned features, the new clicks and the frame's current logits);
  for an object prompted on that frame, the frame is prompted again with the new clicks and its
  current logits; for a new id, the object starts on that frame. The corrected result is
  returned; memory is updated before the next push.
- a prompt for a frame already passed is refused (a stream cannot go back).
- at most `max_cond_frames` conditioning frames per object are attended to (SAM2's
  max_cond_frames_in_attn, closest first), so memory stays flat whatever the number of prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fastsam2.runtime.bank import DEFAULT_MAX_COND
from fastsam2.runtime.errors import InputError, quoted
from fastsam2.runtime.outputs import finite_or_none
from fastsam2.runtime.sam2_math import Resizer, compose_objects, mask_area_bbox
from fastsam2.runtime.tracker import Prompt, Tracker

MAX_OBJECT_ID = 254  # one palette index per object, 255 is DAVIS's "void"


@dataclass
class PromptSpec:
    """What a user gives for one object on one frame, in input pixels."""

    text: str | None = None
    points: list = field(default_factory=list)  # [(x, y)] positive clicks
    neg_points: list = field(default_factory=list)
    box: tuple | None = None  # (x0, y0, x1, y1)
    mask: np.ndarray | None = None  # bool H x W at input resolution

    def merge(self, other: "PromptSpec", where: str) -> None:
        if other.text is not None:
            if self.text is not None and self.text != other.text:
                raise InputError(f"{where} has two texts ({quoted(self.text)}, {quoted(other.text)}); give one")
            self.text = other.text
        if other.box is not None:
            if self.box is not None:
                raise InputError(f"{where} has two boxes; give one box per object and frame")
            self.box = tuple(other.box)
        if other.mask is not None:
            if self.mask is not None:
                raise InputError(f"{where} has two masks; give one")
            self.mask = other.mask
        self.points += [tuple(p) for p in other.points]
        self.neg_points += [tuple(p) for p in other.neg_points]

    @property
    def has_geometry(self) -> bool:
        return bool(self.points or self.neg_points or self.box is not None)

    def record(self) -> dict:
        """The prompt as the user gave it (input pixels), for results.json."""
        rec = {}
        if self.text is not None:
            rec["text"] = self.text
        if self.points:
            rec["points"] = [[float(x), float(y)] for x, y in self.points]
        if self.neg_points:
            rec["neg_points"] = [[float(x), float(y)] for x, y in self.neg_points]
        if self.box is not None:
            rec["box"] = [float(v) for v in self.box]
        if self.mask is not None:
            rec["mask_area"] = int(np.count_nonzero(self.mask))
        return rec


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

    def record(self) -> dict:
        # strict JSON: a non-finite score (a broken graph, a hostile bundle) is written as null
        return {"object_score": finite_or_none(self.object_score, 4), "iou": finite_or_none(self.iou, 4),
                "mask_area": self.area, "bbox": self.bbox, "kept_tokens": self.kept_tokens,
                **({"prompted": True} if self.prompted else {}),
                **({"budget": self.budget} if self.budget else {})}


@dataclass
class FrameResult:
    frame: int  # session frame index: 0 = the first frame pushed
    timestamp: float | None
    objects: dict  # {obj_id: ObjectResult}, ids ascending
    index_mask: np.ndarray  # uint8 H x W: each pixel's object id (highest positive logit), 0 = none
    latency_ms: dict  # per graph, the shared image encoder counted once
    frame_ms: float

    def record(self) -> dict:
        """JSON-ready numbers of this frame (results.json's per-frame entry)."""
        rec = {"frame": self.frame}
        if self.timestamp is not None:
            rec["timestamp"] = round(float(self.timestamp), 4)
        rec["objects"] = {str(o): r.record() for o, r in self.objects.items()}
        rec["latency_ms"] = {k: round(v, 2) for k, v in self.latency_ms.items()}
        rec["frame_ms"] = round(self.frame_ms, 2)
        return rec


def check_object_id(obj_id) -> int:
    if isinstance(obj_id, bool) or not isinstance(obj_id, (int, np.integer)) or not 1 <= obj_id <= MAX_OBJECT_ID:
        raise InputError(f"object id {quoted(obj_id, 20) if isinstance(obj_id, str) else obj_id!r} is not valid: ids are integers 1..{MAX_OBJECT_ID} "
                         f"(one palette index each)")
    return int(obj_id)


def _check_inside(xy, w, h, what):
    x, y = xy
    if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < w and 0 <= y < h):
        raise InputError(f"{what} {x:g},{y:g} is outside the {w}x{h} frame")


def model_prompt(spec: PromptSpec, w: int, h: int, S: int) -> Prompt | None:
    """Input-pixel clicks/box -> SAM2 model coordinates (add_new_points_or_box's normalisation).

    A box goes first as two points labelled 2 and 3, as SAM2 does.
    """
    pts, labels = [], []
    if spec.box is not None:
        x0, y0, x1, y1 = spec.box
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"box {x0:g},{y0:g},{x1:g},{y1:g} must have x0 < x1 and y0 < y1")
        _check_inside((x0, y0), w, h, "box corner")
        _check_inside((x1, y1), w + 1, h + 1, "box corner")
        pts += [(x0, y0), (x1, y1)]
        labels += [2, 3]
    for p in spec.points:
        _check_inside(p, w, h, "point")
        pts.append(p)
        labels.append(1)
    for p in spec.neg_points:
        _check_inside(p, w, h, "negative point")
        pts.append(p)
        labels.append(0)
    if not pts:
        return None
    xy = np.asarray(pts, np.float32) / np.asarray([w, h], np.float32) * np.float32(S)
    return Prompt(xy.astype(np.float32), np.asarray(labels, np.float32))


def text_start_point(tracker: Tracker, enc: dict, w: int, h: int):
    """Search-and-track: the frame's most text-relevant token becomes a positive click."""
    rel = tracker.relevance(enc)
    i = int(np.argmax(rel))
    G = tracker.G
    cell = tracker.S / G
    xm, ym = (i % G + 0.5) * cell, (i // G + 0.5) * cell
    return (xm * w / tracker.S, ym * h / tracker.S), float(rel[i])


class Session:
    """One stream. Build it with `Session.open(bundle, ...)` (ONNX Runtime / TensorRT /
    OpenVINO sessions of a bundle) or directly from sessions with the graph interface
    (`.run(feeds) -> outputs`), e.g. the PyTorch modules in the parity tests."""

    def __init__(self, sessions: dict, constants: dict, settings: dict, *, text_embeddings=None,
                 keep=1.0, keep_floor: int = 64, keep_range: tuple = (0.3, 1.0), fill: str = "no_mem",
                 num_frames: int | None = None, max_cond_frames: int = DEFAULT_MAX_COND,
                 correct_as_cond: bool | None = None, frame_size: tuple | None = None,
                 backend: str | None = None):
        if max_cond_frames < 1:
            raise InputError(f"max_cond_frames must be >= 1, got {max_cond_frames}")
        self.sessions = sessions
        self.constants = constants
        self.settings = settings
        self.text_embeddings = dict(text_embeddings or {})
        self.keep, self.keep_floor, self.keep_range, self.fill = keep, keep_floor, tuple(keep_range), fill
        self.num_frames = num_frames
        self.max_cond_frames = int(max_cond_frames)
        self.correct_as_cond = correct_as_cond
        self.backend = backend
        self.S = int(settings["image_size"])
        self.T = (self.S // 16) ** 2
        self._expected_size = tuple(frame_size) if frame_size else None
        self._resize = Resizer()
        self.reset()

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, bundle, *, keep=None, backend: str = "auto", threads: int | None = None,
             fill: str = "no_mem", num_frames: int | None = None,
             max_cond_frames: int = DEFAULT_MAX_COND, correct_as_cond: bool | None = None,
             frame_size: tuple | None = None, warn=print, graphs: tuple | None = None) -> "Session":
        """A session over a bundle (a folder or a loaded Bundle) on `backend`. `graphs`: the
        (backend name, graph sessions) of this bundle already open (open_backend), to share them
        between sessions, as a server does between its streams; `backend`/`threads` then unused."""
        from fastsam2.runtime.backends import open_backend
        from fastsam2.runtime.bundle import Bundle, load_bundle

        bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        keep = validate_keep(keep, bundle)
        name, sessions = graphs if graphs is not None else open_backend(backend, bundle, threads, warn=warn)
        m = bundle.manifest
        s = cls(sessions, bundle.constants, bundle.settings, text_embeddings=bundle.text_embeddings,
                keep=keep, keep_floor=m.get("keep_floor", 64), keep_range=keep_range(bundle), fill=fill,
                num_frames=num_frames, max_cond_frames=max_cond_frames, correct_as_cond=correct_as_cond,
                frame_size=frame_size, backend=name)
        s.bundle = bundle
        return s

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.reset()
        self.sessions = {}

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every object, prompt and frame: the next push is frame 0 (of any size)."""
        self._trackers: dict[int, Tracker] = {}
        self._start: dict[int, int] = {}
        self._pending: dict[int, dict[int, PromptSpec]] = {}  # frame -> {obj: spec}
        self._removals: dict[int, set] = {}  # frame -> {obj}
        self._frame = -1
        self._size = self._expected_size
        self._cur = None  # the frame just pushed: image, encoder outputs, per-object results
        self.prompt_log: list = []  # every prompt applied: frame, object, what the user gave

    @property
    def frame(self) -> int:
        """Index of the frame pushed last (-1 before the first push)."""
        return self._frame

    @property
    def objects(self) -> list:
        """Ids of the objects being tracked."""
        return sorted(self._trackers)

    def memory_bytes(self) -> int:
        """Bytes held by the objects' memory banks."""
        return sum(t.bank.nbytes() for t in self._trackers.values())

    # -- prompts ------------------------------------------------------------------------------
    def add_prompt(self, obj_id, *, frame: int | None = None, points=(), neg_points=(), box=None,
                   mask=None, text: str | None = None) -> FrameResult | None:
        """Prompt object `obj_id` (new or tracked) on `frame` (default: the next frame pushed).

        points / neg_points: [(x, y)] input pixels; box: (x0, y0, x1, y1); mask: bool H x W;
        text: one of the bundle's prompts (sets the router's text; alone, it also starts the
        object at the frame's most text-relevant token). On the frame just pushed, returns
        that frame's corrected result; otherwise None (applied when the frame arrives).
        """
        obj_id = check_object_id(obj_id)
        frame = self._frame + 1 if frame is None else frame
        if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or frame < 0:
            raise InputError(f"frame must be an integer >= 0, got {frame!r}")
        frame = int(frame)
        if frame < self._frame:
            raise InputError(f"frame {frame} has passed (the session is at frame {self._frame}); "
                             f"a stream cannot go back")
        if self.num_frames is not None and frame >= self.num_frames:
            raise InputError(f"frame {frame} is past the end of the input ({self.num_frames} frames)")
        spec = PromptSpec(text=text, points=[tuple(map(float, p)) for p in points],
                          neg_points=[tuple(map(float, p)) for p in neg_points],
                          box=None if box is None else tuple(map(float, box)),
                          mask=None if mask is None else np.asarray(mask, bool))
        self._check_spec(obj_id, spec, frame)
        if frame > self._frame:
            pending = self._pending.setdefault(frame, {})
            if obj_id in pending:
                pending[obj_id].merge(spec, f"object {obj_id} on frame {frame}")
            else:
                pending[obj_id] = spec
            return None
        return self._correct_now(obj_id, spec)

    def remove(self, obj_id, frame: int | None = None) -> None:
        """Stop tracking `obj_id` from `frame` on (default: the next frame); its bank is freed."""
        obj_id = check_object_id(obj_id)
        frame = self._frame + 1 if frame is None else int(frame)
        if frame <= self._frame:
            raise InputError(f"frame {frame} has passed (the session is at frame {self._frame})")
        if frame == self._frame + 1:
            if obj_id not in self._trackers and not self._scheduled_before(obj_id, frame):
                raise InputError(f"object {obj_id} is not tracked (tracked: "
                                 f"{', '.join(map(str, self.objects)) or 'none'})")
        self._removals.setdefault(frame, set()).add(obj_id)

    def _scheduled_before(self, obj_id: int, frame: int) -> bool:
        return any(obj_id in p for f, p in self._pending.items() if f < frame)

    def _check_spec(self, obj_id: int, spec: PromptSpec, frame: int) -> None:
        if spec.text is not None and spec.text not in self.text_embeddings:
            known = ", ".join(repr(t) for t in self.text_embeddings) or "none"
            raise InputError(f"prompt {quoted(spec.text)} is not in the bundle (it has {known}); "
                             f"export again with --prompts to add it")
        if spec.mask is not None and spec.has_geometry:
            raise InputError(f"object {obj_id}: give a mask or clicks/box on frame {frame}, not both")
        if spec.text is None and spec.mask is None and not spec.has_geometry:
            raise InputError(f"object {obj_id}: give points, a box, a mask or a text prompt")
        if self._size is not None:
            w, h = self._size
            model_prompt(spec, w, h, self.S)  # raises on a point outside the frame
            if spec.mask is not None and spec.mask.shape != (h, w):
                raise InputError(f"mask for object {obj_id} is {spec.mask.shape[1]}x{spec.mask.shape[0]}, "
                                 f"frames are {w}x{h}")

    # -- frames -------------------------------------------------------------------------------
    def push(self, rgb: np.ndarray, timestamp: float | None = None) -> FrameResult:
        """Track one frame (uint8 H x W x 3 RGB): returns every object's result on it."""
        t0 = time.perf_counter()
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise InputError(f"frames must be uint8 H x W x 3 RGB, got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        if self._size is None:
            if w < 2 or h < 2:
                raise InputError(f"frame size {w}x{h} is too small")
            self._size = (w, h)
        elif self._size != (w, h):
            raise InputError(f"frame {self._frame + 1} is {w}x{h} but this session's frames are "
                             f"{self._size[0]}x{self._size[1]}; the size cannot change within a "
                             f"session (reset() or a new session)")
        t = self._frame + 1
        prompts = self._pending.get(t, {})
        for o, spec in prompts.items():  # everything is checked before any state changes
            self._check_spec(o, spec, t)
        for o in sorted(self._removals.get(t, ())):
            if o not in self._trackers and o not in prompts:
                raise InputError(f"object {o} is not tracked on frame {t}, so it cannot be removed there")
        self._pending.pop(t, None)
        for o in self._removals.pop(t, ()):
            self._trackers.pop(o, None)
            self._start.pop(o, None)
        self._frame = t
        self._cur = {"rgb_shape": (h, w), "image": None, "enc": None, "results": {}, "lat": {},
                     "timestamp": timestamp}
        # kept for a prompt on this frame after the push, even with no object tracked yet
        self._cur["image"] = preprocess_for(self, rgb)
        lat = self._cur["lat"]
        for o in sorted(set(self._trackers) | set(prompts)):
            if o in prompts:
                step = self._apply_prompt(o, prompts[o], t, lat)
            else:
                tr = self._trackers[o]
                step = tr.track(t - self._start[o], None, enc=self._encoded())
            self._cur["results"][o] = step
            _add_latency(lat, step.latency_ms)
        return self._result(time.perf_counter() - t0)

    # -- internals ----------------------------------------------------------------------------
    def _encoded(self) -> dict:
        cur = self._cur
        if cur["enc"] is None:
            t0 = time.perf_counter()
            cur["enc"] = self.sessions["image_encoder"].run({"image": cur["image"]})
            cur["lat"]["image_encoder"] = (time.perf_counter() - t0) * 1e3
        return cur["enc"]

    def _new_tracker(self, obj_id: int, frame: int, text: str | None) -> Tracker:
        left = None if self.num_frames is None else self.num_frames - frame
        tr = Tracker(self.sessions, self.constants, self.settings, keep=self.keep,
                     keep_floor=self.keep_floor, fill=self.fill,
                     text_emb=self.text_embeddings.get(text) if text else None, num_frames=left,
                     keep_range=self.keep_range, max_cond=self.max_cond_frames,
                     correct_as_cond=self.correct_as_cond)
        self._trackers[obj_id] = tr
        self._start[obj_id] = frame
        return tr

    def _apply_prompt(self, obj_id: int, spec: PromptSpec, t: int, lat: dict):
        """A prompt for a frame that had not been processed: an initial conditioning frame."""
        tr = self._trackers.get(obj_id)
        if tr is None:
            tr = self._new_tracker(obj_id, t, spec.text)
        elif spec.text is not None:
            tr.set_text(self.text_embeddings[spec.text])
        enc = self._encoded()
        local = t - self._start[obj_id]
        w, h = self._size
        entry = {"frame": t, "object": obj_id, **spec.record()}
        if spec.mask is not None:
            step = tr.add_mask_frame(local, None, spec.mask, enc=enc)
        elif not spec.has_geometry and (tr.frame_idx < 0 or local == tr.frame_idx):
            # text alone starts the object at its most relevant token
            xy, rel = text_start_point(tr, enc, w, h)
            entry["start"] = {"source": "text", "point": [round(xy[0], 1), round(xy[1], 1)],
                              "relevance": finite_or_none(rel, 4)}
            step = tr.add_prompt_frame(local, None, model_prompt(PromptSpec(points=[xy]), w, h, self.S), enc=enc)
        elif not spec.has_geometry:
            # text for an object already tracked: the router's text changes, tracking goes on
            step = tr.track(local, None, enc=enc)
        else:
            step = tr.add_prompt_frame(local, None, model_prompt(spec, w, h, self.S), enc=enc)
        self.prompt_log.append(entry)
        step.prompted = True
        return step

    def _correct_now(self, obj_id: int, spec: PromptSpec) -> FrameResult:
        """A prompt on the frame just pushed."""
        t = self._frame
        if t < 0:
            raise InputError("no frame has been pushed yet")
        t0 = time.perf_counter()
        tr = self._trackers.get(obj_id)
        if tr is None or obj_id not in self._cur["results"]:
            self._trackers.pop(obj_id, None)
            step = self._apply_prompt(obj_id, spec, t, self._cur["lat"])
        else:
            local = t - self._start[obj_id]
            if spec.text is not None:
                tr.set_text(self.text_embeddings[spec.text])
            w, h = self._size
            prompt = model_prompt(spec, w, h, self.S)
            if spec.mask is None and prompt is None:
                raise InputError(f"object {obj_id}: a correction needs points, a box or a mask")
            step = tr.correct(local, prompt=prompt, mask=spec.mask)
            self.prompt_log.append({"frame": t, "object": obj_id, "correction": True, **spec.record()})
            step.prompted = True
        self._cur["results"][obj_id] = step
        _add_latency(self._cur["lat"], step.latency_ms)
        return self._result(time.perf_counter() - t0)

    def _result(self, seconds: float) -> FrameResult:
        cur = self._cur
        return frame_result(self._frame, cur["timestamp"], cur["results"], cur["rgb_shape"],
                            cur["lat"], seconds * 1e3, self._resize)


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


def preprocess_for(session: Session, rgb: np.ndarray) -> np.ndarray:
    from fastsam2.runtime.sam2_math import preprocess

    s = session.settings
    return preprocess(rgb, session.S, s["image_mean"], s["image_std"])


def _add_latency(total: dict, part: dict) -> None:
    for k, v in part.items():
        if k != "image_encoder":  # the shared encoder is timed once, by the session
            total[k] = total.get(k, 0.0) + v


def parse_keep(keep):
    """A keep ratio in (0, 1], or "auto" (adaptive per-frame budget)."""
    import math

    if isinstance(keep, str):
        if keep.strip().lower() == "auto":
            return "auto"
        try:
            keep = float(keep)
        except ValueError:
            raise InputError(f"--keep must be a number in (0, 1] or 'auto', got {quoted(keep)}") from None
    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0) or math.isnan(keep):
        raise InputError(f"--keep must be in (0, 1] or 'auto', got {keep}")
    return float(keep)


def keep_range(bundle) -> tuple:
    """The keep ratios the bundle's engines cover (all of (0, 1] for ONNX Runtime)."""
    rng = bundle.engines.get("keep_range")
    return tuple(rng) if rng else (0.3, 1.0)


def validate_keep(keep, bundle):
    keep = parse_keep(bundle.manifest["keep"] if keep is None else keep)
    rng = bundle.engines.get("keep_range")
    if rng and keep != "auto" and not (rng[0] - 1e-9 <= keep <= rng[1] + 1e-9):
        raise InputError(f"--keep {keep} is outside the engines' profile range {rng[0]}..{rng[1]}")
    return keep
