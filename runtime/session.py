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

import logging
import time

import numpy as np

from fastsam2.runtime.bank import DEFAULT_MAX_COND, MAX_COND_FRAMES, Revision
from fastsam2.runtime.contract import DEFAULT_KEEP_RANGE
from fastsam2.runtime.errors import InputError, quoted
from fastsam2.runtime.outputs import finite_or_none
from fastsam2.runtime.sam2_math import Resizer, preprocess
from fastsam2.runtime.tracker import FILL_MODES, Tracker

# the names callers import from here (the session's edge and its results live beside it)
from fastsam2.runtime.prompts import (  # noqa: F401
    MAX_OBJECT_ID,
    MAX_PROMPT_POINTS,
    PromptSpec,
    check_frame,
    check_not_passed,
    check_spec,
    check_timestamp,
    check_object_id,
    frame_array,
    keep_range,
    model_prompt,
    parse_keep,
    text_start_point,
    validate_keep,
)
from fastsam2.runtime.batched import bundle_batchable, track_together
from fastsam2.runtime.results import FrameResult, ObjectResult, add_latency, frame_result  # noqa: F401
from fastsam2.runtime.snapshot import Snapshots, new_stream_id

_log = logging.getLogger(__name__)


class Session(Snapshots):
    """One stream. Build it with `Session.open(bundle, ...)` (ONNX Runtime / TensorRT /
    OpenVINO sessions of a bundle) or directly from sessions with the graph interface
    (`.run(feeds) -> outputs`), e.g. the PyTorch modules in the parity tests."""

    def __init__(self, sessions: dict, constants: dict, settings: dict, *, text_embeddings=None,
                 keep=1.0, keep_floor: int = 64, keep_range: tuple = DEFAULT_KEEP_RANGE, fill: str = "no_mem",
                 num_frames: int | None = None, max_cond_frames: int = DEFAULT_MAX_COND,
                 correct_as_cond: bool | None = None, frame_size: tuple | None = None,
                 backend: str | None = None, batch_objects: bool = False):
        if (isinstance(max_cond_frames, bool) or not isinstance(max_cond_frames, (int, np.integer))
                or not 1 <= max_cond_frames <= MAX_COND_FRAMES):
            raise InputError(f"max_cond_frames must be an integer in 1..{MAX_COND_FRAMES}, got "
                             f"{quoted(repr(max_cond_frames), 30)}")
        if fill not in FILL_MODES:
            raise InputError(f"fill must be one of {', '.join(FILL_MODES)}, got {quoted(repr(fill), 30)}")
        self.closed = False
        self._clock = Revision()  # counts changes, for snapshot increments (runtime/snapshot.py)
        self._delta_rev = None  # the revision the last snapshot_delta() covered
        self.sessions = sessions
        self.constants = constants
        self.settings = settings
        self.text_embeddings = dict(text_embeddings or {})
        self.keep, self.keep_floor, self.keep_range, self.fill = keep, keep_floor, tuple(keep_range), fill
        self.num_frames = num_frames
        self.max_cond_frames = int(max_cond_frames)
        self.correct_as_cond = correct_as_cond
        self.backend = backend
        # a frame's tracked objects as the batch of the router, decoder and memory encoder
        # (runtime/batched.py); needs graphs with the batch axis
        self.batch_objects = bool(batch_objects)
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
             frame_size: tuple | None = None, warn=None, graphs: tuple | None = None,
             snapshot: bytes | None = None, batch_objects: bool | None = None) -> "Session":
        """A session over a bundle (a folder or a loaded Bundle) on `backend`. `graphs`: the
        (backend name, graph sessions) of this bundle already open (open_backend), to share them
        between sessions, as a server does between its streams; `backend`/`threads` then unused.
        `snapshot`: a Session.snapshot() of a session of this bundle with these settings (or
        a list: a full snapshot then its increments), restored before the session is returned.
        `batch_objects`: run a frame's tracked objects as one batch per graph (None, the
        default: wherever the bundle can; measured on a 2-core AVX-512 CPU at 1024 px with 8
        objects it took 4-9 % off a frame at keep 0.3, -2..+2 % at keep 1.0, where memory
        attention, not batched, dominates). A bundle exported before the batch axis runs them
        one by one (with a warning when asked for)."""
        from fastsam2.runtime.backends import open_backend
        from fastsam2.runtime.bundle import Bundle, load_bundle

        bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        keep = validate_keep(keep, bundle)
        name, sessions = graphs if graphs is not None else open_backend(backend, bundle, threads, warn=warn)
        m = bundle.manifest
        if batch_objects and not bundle_batchable(m):
            (warn or _log.warning)("warning: this bundle's graphs take one object per call (exported before the batch "
                 "axis): objects run one by one; export it again to batch them")
        batch_objects = batch_objects is not False and bundle_batchable(m)
        s = cls(sessions, bundle.constants, bundle.settings, text_embeddings=bundle.text_embeddings,
                keep=keep, keep_floor=m.get("keep_floor", 64), keep_range=keep_range(bundle), fill=fill,
                num_frames=num_frames, max_cond_frames=max_cond_frames, correct_as_cond=correct_as_cond,
                frame_size=frame_size, backend=name, batch_objects=batch_objects)
        s.bundle = bundle
        if snapshot is not None:
            s.restore_state(snapshot)
        return s

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.reset()
        self.sessions = {}
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise InputError("session is closed: open a new one")

    def _tick(self) -> None:
        self._check_open()
        self._clock.now += 1

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every object, prompt and frame: the next push is frame 0 (of any size)."""
        self._clock.now += 1
        self._delta_rev = None  # the next snapshot_delta() starts a new chain with a full snapshot
        self._stream = new_stream_id()
        self._pending_rev = self._log_reset_rev = self._clock.now
        self._log_revs: list = []  # the revision each prompt_log entry was written at
        self._trackers: dict[int, Tracker] = {}
        self._start: dict[int, int] = {}
        self._pending: dict[int, dict[int, PromptSpec]] = {}  # frame -> {obj: spec}
        self._removals: dict[int, set] = {}  # frame -> {obj}
        self._frame = -1
        self._size = self._expected_size
        self._pushed = None  # the frame just pushed: image, encoder outputs, per-object results
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
        self._check_open()
        obj_id = check_object_id(obj_id)
        frame = check_frame(self._frame + 1 if frame is None else frame, self._frame)
        check_not_passed(frame, self._frame, correction=True)
        if self.num_frames is not None and frame >= self.num_frames:
            raise InputError(f"frame {frame} is past the end of the input ({self.num_frames} frames)")
        spec = PromptSpec.checked(points=points, neg_points=neg_points, box=box, mask=mask, text=text)
        self._check_spec(obj_id, spec, frame)
        if frame > self._frame:
            pending = self._pending.get(frame, {})
            if obj_id in pending:
                merged = PromptSpec(pending[obj_id].text, list(pending[obj_id].points),
                                    list(pending[obj_id].neg_points), pending[obj_id].box, pending[obj_id].mask)
                merged.merge(spec, f"object {obj_id} on frame {frame}")
                self._check_spec(obj_id, merged, frame)  # e.g. a mask merged with clicks
                spec = merged
            self._tick()
            self._pending.setdefault(frame, {})[obj_id] = spec
            self._pending_rev = self._clock.now
            return None
        self._tick()
        return self._correct_now(obj_id, spec)

    def remove(self, obj_id, frame: int | None = None) -> None:
        """Stop tracking `obj_id` from `frame` on (default: the next frame); its bank is freed."""
        self._check_open()
        obj_id = check_object_id(obj_id)
        frame = check_frame(self._frame + 1 if frame is None else frame, self._frame)
        check_not_passed(frame, self._frame, correction=False)
        if frame == self._frame + 1:
            if obj_id not in self._trackers and not self._scheduled_before(obj_id, frame):
                raise InputError(f"object {obj_id} is not tracked (tracked: "
                                 f"{', '.join(map(str, self.objects)) or 'none'})")
        self._tick()
        self._removals.setdefault(frame, set()).add(obj_id)

    def _scheduled_before(self, obj_id: int, frame: int) -> bool:
        return any(obj_id in p for f, p in self._pending.items() if f < frame)

    def _check_spec(self, obj_id: int, spec: PromptSpec, frame: int) -> None:
        check_spec(spec, obj_id, frame, self._size, self.S, self.text_embeddings)

    # -- frames -------------------------------------------------------------------------------
    def push(self, rgb: np.ndarray, timestamp: float | None = None) -> FrameResult:
        """Track one frame (uint8 H x W x 3 RGB): returns every object's result on it."""
        t0 = time.perf_counter()
        self._check_open()
        rgb, timestamp = frame_array(rgb), check_timestamp(timestamp)
        h, w = rgb.shape[:2]
        if self._size is None:
            if w < 2 or h < 2:
                raise InputError(f"frame size {w}x{h} is too small")
        elif self._size != (w, h):
            raise InputError(f"frame {self._frame + 1} is {w}x{h} but this session's frames are "
                             f"{self._size[0]}x{self._size[1]}; the size cannot change within a "
                             f"session (reset() or a new session)")
        size = self._size or (w, h)
        t = self._frame + 1
        prompts = self._pending.get(t, {})
        self._size, checked = size, False
        try:  # everything is checked before any state changes
            for o, spec in prompts.items():
                self._check_spec(o, spec, t)
            for o in sorted(self._removals.get(t, ())):
                if o not in self._trackers and o not in prompts:
                    raise InputError(f"object {o} is not tracked on frame {t}, so it cannot be removed there")
            checked = True
        finally:
            if not checked and self._frame < 0:
                self._size = self._expected_size
        self._tick()
        if prompts:
            self._pending_rev = self._clock.now
        self._pending.pop(t, None)
        for o in self._removals.pop(t, ()):
            self._trackers.pop(o, None)
            self._start.pop(o, None)
        self._frame = t
        self._pushed = {"rgb_shape": (h, w), "image": None, "enc": None, "results": {}, "lat": {},
                     "timestamp": timestamp}
        # kept for a prompt on this frame after the push, even with no object tracked yet
        self._pushed["image"] = preprocess(rgb, self.S, self.settings["image_mean"], self.settings["image_std"])
        lat = self._pushed["lat"]
        steps = {o: self._apply_prompt(o, spec, t, lat) for o, spec in sorted(prompts.items())}
        steps.update(self._track(t, [o for o in self._trackers if o not in prompts]))
        for o in sorted(steps):
            self._pushed["results"][o] = steps[o]
            add_latency(lat, steps[o].latency_ms)
        return self._result(time.perf_counter() - t0)

    # -- internals ----------------------------------------------------------------------------
    def _track(self, t: int, objs: list) -> dict:
        """Tracked frames of `objs` on frame t, each at its own frame index (frames since its
        start): one batch per graph, or one object at a time."""
        objs = sorted(objs)
        local = [t - self._start[o] for o in objs]
        if self.batch_objects and len(objs) > 1:
            return dict(zip(objs, track_together([self._trackers[o] for o in objs], local, self._encoded())))
        return {o: self._trackers[o].track(f, None, enc=self._encoded()) for o, f in zip(objs, local)}

    def _encoded(self) -> dict:
        cur = self._pushed
        if cur["enc"] is None:
            t0 = time.perf_counter()
            cur["enc"] = self.sessions["image_encoder"].run({"image": cur["image"]})
            cur["lat"]["image_encoder"] = (time.perf_counter() - t0) * 1e3
        return cur["enc"]

    def _new_tracker(self, obj_id: int, frame: int, text: str | None) -> Tracker:
        left = None if self.num_frames is None else self.num_frames - frame
        tr = self.make_tracker(text_emb=self.text_embeddings.get(text) if text else None, num_frames=left)
        self._trackers[obj_id] = tr
        self._start[obj_id] = frame
        return tr

    def make_tracker(self, text_emb=None, num_frames: int | None = None) -> Tracker:
        """An object's tracker with this session's settings (also what a snapshot restores into)."""
        return Tracker(self.sessions, self.constants, self.settings, keep=self.keep,
                       keep_floor=self.keep_floor, fill=self.fill, text_emb=text_emb, num_frames=num_frames,
                       keep_range=self.keep_range, max_cond=self.max_cond_frames,
                       correct_as_cond=self.correct_as_cond, clock=self._clock)

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
        entry = {"frame": t, "object": obj_id, **spec.to_json()}
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
        self._log(entry)
        step.prompted = True
        return step

    def _correct_now(self, obj_id: int, spec: PromptSpec) -> FrameResult:
        """A prompt on the frame just pushed."""
        t = self._frame
        if t < 0:
            raise InputError("no frame has been pushed yet: a correction needs a pushed frame")
        if self._pushed is None:
            raise InputError(f"frame {t} was pushed before this session was restored from a snapshot, "
                             f"which does not hold its image features: prompt frame {t + 1} instead")
        t0 = time.perf_counter()
        tr = self._trackers.get(obj_id)
        if tr is None or obj_id not in self._pushed["results"]:
            self._trackers.pop(obj_id, None)
            step = self._apply_prompt(obj_id, spec, t, self._pushed["lat"])
        else:
            local = t - self._start[obj_id]
            if spec.text is not None:
                tr.set_text(self.text_embeddings[spec.text])
            w, h = self._size
            prompt = model_prompt(spec, w, h, self.S)
            if spec.mask is None and prompt is None:
                raise InputError(f"object {obj_id}: a correction needs points, a box or a mask")
            step = tr.correct(local, prompt=prompt, mask=spec.mask)
            self._log({"frame": t, "object": obj_id, "correction": True, **spec.to_json()})
            step.prompted = True
        self._pushed["results"][obj_id] = step
        add_latency(self._pushed["lat"], step.latency_ms)
        return self._result(time.perf_counter() - t0)

    def _log(self, entry: dict) -> None:
        self.prompt_log.append(entry)
        self._log_revs.append(self._clock.now)

    def _result(self, seconds: float) -> FrameResult:
        cur = self._pushed
        return frame_result(self._frame, cur["timestamp"], cur["results"], cur["rgb_shape"],
                            cur["lat"], seconds * 1e3, self._resize)

