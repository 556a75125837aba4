"""What a user prompts with, checked at the session's edge: object ids, frames, clicks, boxes,
masks, texts and the keep ratio. Anything a caller passes (a CLI, a prompts file, a Triton
client, a Python user) becomes a PromptSpec in input pixels or one InputError that says what
was wrong; `model_prompt` turns a checked spec into SAM2's model coordinates. Torch-free."""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .contract import DEFAULT_KEEP_RANGE
from .errors import InputError, quoted
from .tracker import Prompt, Tracker

MAX_OBJECT_ID = 254  # one palette index per object, 255 is DAVIS's "void"
# clicks (box corners count two) per object and frame, after merging every prompt given for it:
# SAM2 is driven by a few clicks; the decoder's point input grows with each one
MAX_PROMPT_POINTS = 64
MAX_FRAME_INDEX = 1 << 53  # frame numbers stay exact in JSON (results.json, snapshots)


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _shown(v) -> str:
    """A caller's value as a message repeats it: strings quoted, anything else by its repr, cut."""
    if isinstance(v, str):
        return quoted(v, 40)
    r = repr(v) if not isinstance(v, int) or abs(v) < 10 ** 40 else f"an integer of {len(str(abs(v)))} digits"
    return r if len(r) <= 40 else r[:40] + "..."


def check_object_id(obj_id) -> int:
    if isinstance(obj_id, bool) or not isinstance(obj_id, (int, np.integer)) or not 1 <= obj_id <= MAX_OBJECT_ID:
        raise InputError(f"object id {_shown(obj_id)} "
                         f"is not valid: ids are integers 1..{MAX_OBJECT_ID} (one palette index each)")
    return int(obj_id)


def frame_array(rgb) -> np.ndarray:
    """A pushed frame as a uint8 H x W x 3 array, or one InputError saying what it is instead."""
    try:
        arr = np.asarray(rgb)
    except (ValueError, TypeError):
        raise InputError("frames must be uint8 H x W x 3 RGB arrays, got a ragged sequence") from None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"frames must be uint8 H x W x 3 RGB, got {arr.dtype} {tuple(arr.shape)}")
    return arr


def check_timestamp(timestamp):
    """A pushed frame's timestamp: finite seconds, or None."""
    if timestamp is not None and not (isinstance(timestamp, (int, float, np.integer, np.floating))
                                      and not isinstance(timestamp, bool) and np.isfinite(timestamp)):
        raise InputError(f"timestamp must be a finite number of seconds or None, got {quoted(repr(timestamp), 30)}")
    return timestamp


def check_not_passed(frame: int, pushed: int, correction: bool) -> None:
    """A prompt may name the frame just pushed (a correction of it); a removal only a later one."""
    if frame < pushed and correction:
        raise InputError(f"frame {frame} has passed (the session is at frame {pushed}); a stream cannot go back")
    if frame < pushed or (frame == pushed and not correction):
        raise InputError(f"frame {frame} has passed (the session is at frame {pushed})")


def check_frame(frame, pushed: int) -> int:
    """A frame index a prompt or removal names; `pushed` is the frame pushed last (-1: none)."""
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise InputError(f"frame must be an integer >= 0, got {_shown(frame)}")
    if frame < 0:
        if pushed < 0:
            raise InputError(f"frame {int(frame)} does not exist: no frame has been pushed yet, so there is "
                             f"nothing to correct (a correction needs a pushed frame; prompt frame 0 or later)")
        raise InputError(f"frame must be an integer >= 0, got {int(frame)}")
    if frame > MAX_FRAME_INDEX:
        raise InputError(f"frame {_shown(int(frame))} is past the largest frame number, {MAX_FRAME_INDEX}")
    return int(frame)


def _xy(p, what: str) -> tuple:
    try:
        vals = list(p) if not isinstance(p, (str, bytes, dict)) else None
    except TypeError:
        vals = None
    if vals is None or len(vals) != 2 or not all(_real(v) for v in vals):
        raise InputError(f"each {what} must be two finite numbers x, y; got {_shown(p)}")
    return float(vals[0]), float(vals[1])


def _points(points, what: str) -> list:
    if points is None:
        return []
    if isinstance(points, (str, bytes, dict)) or _real(points):
        raise InputError(f"{what}s must be a list of (x, y) pairs; got {_shown(points)}")
    try:
        points = points if hasattr(points, "__len__") else list(itertools.islice(points, MAX_PROMPT_POINTS + 1))
        n = len(points)
    except TypeError:
        raise InputError(f"{what}s must be a list of (x, y) pairs; got {_shown(points)}") from None
    if n > MAX_PROMPT_POINTS:
        raise InputError(f"{n} {what}s: at most {MAX_PROMPT_POINTS} clicks per object and frame")
    return [_xy(p, what) for p in points]


def _box(box) -> tuple | None:
    if box is None:
        return None
    try:
        vals = list(box) if not isinstance(box, (str, bytes, dict)) else None
    except TypeError:
        vals = None
    if vals is None or len(vals) != 4 or not all(_real(v) for v in vals):
        raise InputError(f"a box must be four finite numbers x0, y0, x1, y1; got {_shown(box)}")
    return tuple(float(v) for v in vals)


def _mask(mask) -> np.ndarray | None:
    if mask is None:
        return None
    try:
        m = np.asarray(mask)
    except (ValueError, TypeError):
        raise InputError("a mask must be a 2-D H x W array (bool or 0/1); got a ragged sequence") from None
    if m.dtype.kind not in "biuf":
        raise InputError(f"a mask must be a 2-D H x W array of bools or numbers; got dtype {m.dtype}")
    if m.ndim != 2:
        raise InputError(f"a mask must be a 2-D H x W array; got shape {tuple(m.shape)}")
    return m.astype(bool)


@dataclass
class PromptSpec:
    """What a user gives for one object on one frame, in input pixels."""

    text: str | None = None
    points: list = field(default_factory=list)  # [(x, y)] positive clicks
    neg_points: list = field(default_factory=list)
    box: tuple | None = None  # (x0, y0, x1, y1)
    mask: np.ndarray | None = None  # bool H x W at input resolution

    @classmethod
    def checked(cls, *, points=(), neg_points=(), box=None, mask=None, text=None) -> "PromptSpec":
        """A spec from a caller's values, any of which may be of the wrong type: InputError."""
        if text is not None and not isinstance(text, str):
            raise InputError(f"a text prompt must be a string; got {_shown(text)}")
        spec = cls(text=text, points=_points(points, "point"), neg_points=_points(neg_points, "negative point"),
                   box=_box(box), mask=_mask(mask))
        spec.check_size("this prompt")
        return spec

    @property
    def clicks(self) -> int:
        """Decoder points this spec becomes (a box is two)."""
        return len(self.points) + len(self.neg_points) + (2 if self.box is not None else 0)

    def check_size(self, where: str) -> None:
        if self.clicks > MAX_PROMPT_POINTS:
            raise InputError(f"{where} has {self.clicks} clicks (a box counts 2): at most "
                             f"{MAX_PROMPT_POINTS} per object and frame")

    def merge(self, other: "PromptSpec", where: str) -> None:
        if other.text is not None:
            if self.text is not None and self.text != other.text:
                raise InputError(f"{where} has two texts ({quoted(self.text)}, {quoted(other.text)}); give one")
        if other.box is not None and self.box is not None:
            raise InputError(f"{where} has two boxes; give one box per object and frame")
        if other.mask is not None and self.mask is not None:
            raise InputError(f"{where} has two masks; give one")
        # the cap holds for what the decoder gets: many small prompts merged are one big one
        merged = PromptSpec(points=self.points + list(other.points), neg_points=self.neg_points + list(other.neg_points),
                            box=self.box if other.box is None else other.box)
        merged.check_size(where)
        self.text = self.text if other.text is None else other.text
        self.box = self.box if other.box is None else tuple(other.box)
        self.mask = self.mask if other.mask is None else other.mask
        self.points += [tuple(p) for p in other.points]
        self.neg_points += [tuple(p) for p in other.neg_points]

    @property
    def has_geometry(self) -> bool:
        return bool(self.points or self.neg_points or self.box is not None)

    def to_json(self) -> dict:
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


def check_spec(spec: PromptSpec, obj_id: int, frame: int, size: tuple | None, S: int, texts) -> None:
    """A spec is complete and fits the session: a known text, a mask or clicks (not both), the
    clicks inside the w x h frame (`size`, once known) and the mask of the frames' size."""
    if spec.text is not None and spec.text not in texts:
        known = ", ".join(repr(t) for t in texts) or "none"
        raise InputError(f"prompt {quoted(spec.text)} is not in the bundle (it has {known}); "
                         f"export again with --prompts to add it")
    if spec.mask is not None and spec.has_geometry:
        raise InputError(f"object {obj_id}: give a mask or clicks/box on frame {frame}, not both")
    if spec.text is None and spec.mask is None and not spec.has_geometry:
        raise InputError(f"object {obj_id}: give points, a box, a mask or a text prompt")
    spec.check_size(f"object {obj_id} on frame {frame}")
    if size is not None:
        w, h = size
        model_prompt(spec, w, h, S)  # raises on a point outside the frame
        if spec.mask is not None and spec.mask.shape != (h, w):
            raise InputError(f"mask for object {obj_id} is {spec.mask.shape[1]}x{spec.mask.shape[0]} "
                             f"(W x H), frames are {w}x{h}")


def _check_inside(xy, w, h, what, far_corner: bool = False):
    """A click lies on a pixel (0 <= x < w); a box's far corner may lie on the frame's edge
    (x1 <= w), as SAM2's boxes are in continuous coordinates."""
    x, y = xy
    inside = (0 <= x <= w and 0 <= y <= h) if far_corner else (0 <= x < w and 0 <= y < h)
    if not (np.isfinite(x) and np.isfinite(y) and inside):
        limit = f"at most {w},{h}" if far_corner else f"0..{w - 1},0..{h - 1}"
        raise InputError(f"{what} {x:g},{y:g} is outside the {w}x{h} frame ({limit})")


def model_prompt(spec: PromptSpec, w: int, h: int, S: int) -> Prompt | None:
    """Input-pixel clicks/box -> SAM2 model coordinates (add_new_points_or_box's normalisation).

    A box goes first as two points labelled 2 and 3, as SAM2 does.
    """
    spec.check_size("the prompt")
    pts, labels = [], []
    if spec.box is not None:
        x0, y0, x1, y1 = spec.box
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"box {x0:g},{y0:g},{x1:g},{y1:g} must have x0 < x1 and y0 < y1")
        _check_inside((x0, y0), w, h, "box corner")
        _check_inside((x1, y1), w, h, "box corner", far_corner=True)
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


def parse_keep(keep, auto: bool = True):
    """A user's keep ratio: a number in (0, 1], or "auto" (adaptive per-frame budget) where
    `auto` allows it. The one parser of --keep (fastsam2-run, -export, -calibrate, -eval,
    -profile through parse_keeps); its messages name the flag."""
    either = " or 'auto'" if auto else ""
    if isinstance(keep, str):
        if auto and keep.strip().lower() == "auto":
            return "auto"
        try:
            keep = float(keep)
        except ValueError:
            raise InputError(f"--keep must be a number in (0, 1]{either}, got {quoted(keep)}") from None
    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0) or math.isnan(keep):
        raise InputError(f"--keep must be in (0, 1]{either}, got {keep}")
    return float(keep)


def parse_keeps(keeps) -> tuple:
    """Several fixed keep ratios (fastsam2-profile's --keep 1.0,0.5): comma-separated text or
    a sequence, each checked by parse_keep."""
    if isinstance(keeps, str):
        text = keeps
        try:
            keeps = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--keep must be comma-separated numbers in (0, 1], got {text!r}") from None
    try:
        keeps = tuple(keeps)
    except TypeError:
        raise InputError(f"--keep must be comma-separated numbers in (0, 1], got {keeps!r}") from None
    if not keeps:
        raise InputError("--keep: give at least one keep ratio")
    return tuple(parse_keep(k, auto=False) for k in keeps)


def keep_range(bundle) -> tuple:
    """The range keep "auto" adapts its per-frame budget in: the engines' profile range when
    the bundle has TensorRT engines (they run no k outside it), else 0.3..1.0, the keep range
    every shipped target declares (ONNX Runtime itself runs any k)."""
    rng = bundle.engines.get("keep_range")
    return tuple(rng) if rng else DEFAULT_KEEP_RANGE


def validate_keep(keep, bundle):
    keep = parse_keep(bundle.manifest["keep"] if keep is None else keep)
    rng = bundle.engines.get("keep_range")
    if rng and keep != "auto" and not (rng[0] - 1e-9 <= keep <= rng[1] + 1e-9):
        raise InputError(f"--keep {keep} is outside the engines' profile range {rng[0]}..{rng[1]}")
    return keep
