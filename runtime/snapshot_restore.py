"""Restoring a snapshot (runtime/snapshot.py): each blob is checked whole against the bundle's
geometry and the state it applies to, into a plan of checked values; only then are the plans
applied, so a bad snapshot changes nothing. Every failure is one SnapshotError (an InputError)."""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .prompts import MAX_FRAME_INDEX as MAX_FRAME
from .prompts import MAX_OBJECT_ID, PromptSpec, check_spec
from .snapshot_format import SnapshotError, _int

MAX_SIDE = 1 << 15
MAX_PENDING, MAX_REMOVALS, MAX_LOG = 10_000, 10_000, 100_000
OBJECT_KEYS = {"start", "new", "frame_idx", "logits", "grid", "budget", "text", "slots", "ptrs", "cond"}
PENDING_KEYS = {"frame", "object", "text", "points", "neg_points", "box", "mask"}


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise SnapshotError(f"snapshot is malformed: {what}")


class _Arrays:
    """The blob's arrays, each taken once with the dtype and shape the bundle implies."""

    def __init__(self, arrays: dict):
        self.arrays, self.used = arrays, set()

    def take(self, name: str, dtype: str, shape: tuple) -> np.ndarray:
        a = self.arrays.get(name)
        _need(a is not None, f"array {name} is missing")
        _need(a.dtype == np.dtype(dtype) and tuple(a.shape) == tuple(shape),
              f"array {name} is {a.dtype} {list(a.shape)}, expected {np.dtype(dtype)} {list(shape)}")
        self.used.add(name)
        return a

    def check_all_used(self) -> None:
        extra = sorted(set(self.arrays) - self.used)
        _need(not extra, f"array {extra[0][:40] if extra else ''} is not part of the state")


def plan_blob(s, meta: dict, arrays: dict, state: dict, first: bool, chain: bool) -> dict:
    """Check one blob against the session's bundle and settings and the state it applies to
    (`state`: objects, starts, rev, log length, stream; updated as if applied)."""
    kind, rev = meta.get("kind"), meta.get("rev")
    _need(kind in ("full", "increment"), "kind must be 'full' or 'increment'")
    _need(_int(rev, 0, MAX_FRAME), "rev must be an integer >= 0")
    stream = meta.get("stream")
    _need(isinstance(stream, str) and 0 < len(stream) <= 64, "stream must be a short string")
    full = kind == "full"
    if not full:
        since = meta.get("since")
        _need(_int(since, 0, rev), "an increment's since must be an integer in 0..rev")
        if stream != state["stream"]:
            raise SnapshotError("the increment is of another stream than the state it would apply to")
        if not since <= state["rev"] <= rev:
            raise SnapshotError(f"the increment covers revisions {since}..{rev}, the state is at revision "
                                f"{state['rev']}: an increment is missing from the chain")
    frame, size = meta.get("frame"), meta.get("size")
    _need(_int(frame, -1, MAX_FRAME), f"frame must be an integer in -1..{MAX_FRAME}")
    _need(size is None or (isinstance(size, list) and len(size) == 2 and all(_int(v, 2, MAX_SIDE) for v in size)),
          f"size must be [width, height] in 2..{MAX_SIDE}")
    _need(size is not None or frame < 0, "a session that has pushed frames has a frame size")
    if s._expected_size is not None:
        _need(size is not None and tuple(size) == tuple(s._expected_size), "size differs from the session's frame_size")
    size = None if size is None else (size[0], size[1])
    arr = _Arrays(arrays)
    plan = {"full": full, "rev": rev, "stream": stream, "frame": frame, "size": size,
            "removals": _removals(meta.get("removals"), frame)}
    plan["pending"] = _pending(s, meta.get("pending"), frame, size, arr, full)
    plan["log_from"], plan["log"] = _log(meta.get("log"), state["log"], full)
    objs = meta.get("objects")
    _need(isinstance(objs, dict) and len(objs) <= MAX_OBJECT_ID, "objects must be an object of at most "
          f"{MAX_OBJECT_ID} entries")
    plan["objects"] = {}
    for key, e in objs.items():
        _need(key.isdigit() and str(int(key)) == key and 1 <= int(key) <= MAX_OBJECT_ID, f"object id {key[:20]!r} is not one of 1..{MAX_OBJECT_ID}")
        o = int(key)
        plan["objects"][o] = _object(s, o, e, frame, arr, state, full)
    arr.check_all_used()
    state.update(objects=set(plan["objects"]), starts={o: p["start"] for o, p in plan["objects"].items()},
                 rev=rev, log=plan["log_from"] + len(plan["log"]), stream=stream)
    return plan


def _removals(v, frame: int) -> dict:
    _need(isinstance(v, list) and len(v) <= MAX_REMOVALS, f"removals must be a list of at most {MAX_REMOVALS}")
    out = {}
    for r in v:
        _need(isinstance(r, list) and len(r) == 2 and _int(r[0], frame + 1, MAX_FRAME)
              and _int(r[1], 1, MAX_OBJECT_ID), "a removal is [later frame, object id]")
        out.setdefault(r[0], set()).add(r[1])
    return out


def _pending(s, v, frame: int, size, arr: _Arrays, full: bool):
    if v is None:
        _need(not full, "a full snapshot holds its pending prompts")
        return None
    _need(isinstance(v, list) and len(v) <= MAX_PENDING, f"pending must be a list of at most {MAX_PENDING}")
    out = {}
    for i, e in enumerate(v):
        _need(isinstance(e, dict) and set(e) == PENDING_KEYS, f"pending[{i}] must have keys {sorted(PENDING_KEYS)}")
        f, o = e["frame"], e["object"]
        _need(_int(f, frame + 1, MAX_FRAME) and _int(o, 1, MAX_OBJECT_ID) and o not in out.get(f, {}),
              f"pending[{i}] is for a later frame and a valid object, once")
        _need(s.num_frames is None or f < s.num_frames, f"pending[{i}] is past the input's end")
        _need(isinstance(e["mask"], bool), f"pending[{i}].mask must be true or false")
        mask = None
        if e["mask"]:
            m = arr.arrays.get(f"pending{i}.mask")
            _need(m is not None and m.ndim == 2, f"pending[{i}]'s mask array is missing or not 2-D")
            mask = arr.take(f"pending{i}.mask", "bool", size[::-1] if size else m.shape)
        try:
            spec = PromptSpec.checked(points=e["points"], neg_points=e["neg_points"], box=e["box"],
                                      mask=mask, text=e["text"])
            check_spec(spec, o, f, size, s.S, s.text_embeddings)
        except InputError as err:
            raise SnapshotError(f"snapshot pending prompt {i}: {err}") from None
        out.setdefault(f, {})[o] = spec
    return out


def _log(v, have: int, full: bool) -> tuple:
    _need(isinstance(v, dict) and set(v) == {"from", "entries"}, "log must be {from, entries}")
    start, entries = v["from"], v["entries"]
    _need(_int(start, 0, 0 if full else have), f"log.from must be in 0..{0 if full else have}")
    _need(isinstance(entries, list) and len(entries) <= MAX_LOG and all(isinstance(x, dict) for x in entries),
          f"log.entries must be a list of at most {MAX_LOG} objects")
    return start, entries


def _object(s, o: int, e, frame: int, arr: _Arrays, state: dict, full: bool) -> dict:
    g, T, key = s.settings, s.T, f"o{o}"
    _need(isinstance(e, dict) and set(e) <= OBJECT_KEYS and isinstance(e.get("new"), bool),
          f"object {o} entry has unknown keys or no 'new'")
    new, start = e["new"], e.get("start")
    _need(_int(start, 0, max(frame, 0)), f"object {o}'s start must be a frame already pushed")
    if not new:
        _need(not full, f"object {o}: a full snapshot holds whole objects")
        if o not in state["objects"] or state["starts"].get(o) != start:
            raise SnapshotError(f"the increment changes object {o}, which the state it applies to does not hold")
    else:
        _need({"frame_idx", "text", "slots", "ptrs", "cond"} <= set(e), f"new object {o} is incomplete")
    last = frame - start  # the object's own frame counter cannot pass this
    feat_dim, mem_dim, hidden = int(np.asarray(s.constants["no_mem_embed"]).size), int(g["mem_dim"]), int(g["hidden_dim"])
    op = {"new": new, "start": start}
    adaptive = s.keep == "auto"
    if "frame_idx" in e:
        _need(_int(e["frame_idx"], -1, last), f"object {o}'s frame_idx must be in -1..{last}")
        _need(isinstance(e.get("logits"), bool) and isinstance(e.get("grid"), bool) and ("budget" in e) == adaptive,
              f"object {o}'s state needs logits and grid flags (and budget with keep auto)")
        _need(not e["grid"] or s.fill == "last", f"object {o} has a fill grid, the session's fill is {s.fill}")
        G4 = 4 * (s.S // 16)
        op["frame_idx"] = e["frame_idx"]
        op["logits"] = arr.take(f"{key}.logits", "<f4", (1, 1, G4, G4)) if e["logits"] else None
        op["grid"] = arr.take(f"{key}.grid", "<f4", (T, feat_dim)) if e["grid"] else None
        if adaptive:
            b = e["budget"]
            _need(isinstance(b, dict) and set(b) == {"motion", "prev"} and isinstance(b["prev"], bool)
                  and isinstance(b["motion"], (int, float)) and not isinstance(b["motion"], bool)
                  and math.isfinite(b["motion"]), f"object {o}'s budget must be {{motion, prev}}")
            op["budget"] = (float(b["motion"]), arr.take(f"{key}.budget_prev", "<f4", (T, feat_dim)) if b["prev"] else None)
    else:
        _need("logits" not in e and "grid" not in e and "budget" not in e, f"object {o}: state flags without frame_idx")
    if "text" in e:
        _need(e["text"] is True, f"object {o}'s text flag must be true when present")
        op["text"] = arr.take(f"{key}.text", "<f4", (1, int(g.get("text_dim", 512))))
    slots, ptr_slots = int(g["num_maskmem"]) - 1, max(int(g["max_obj_ptrs_in_encoder"]) - 1, 1)
    op["slots"] = []
    v = e.get("slots", [])
    _need(isinstance(v, list) and len(v) <= slots, f"object {o}'s slots must be a list of at most {slots}")
    seen = set()
    for item in v:
        _need(isinstance(item, list) and len(item) == 3 and _int(item[0], 0, slots - 1) and item[0] not in seen
              and _int(item[1], -1, last) and _int(item[2], 0, T), f"object {o}: a slot is [slot, frame, count]")
        j, f, n = item
        seen.add(j)
        _need((f < 0 and n == 0) or (f >= 0 and f % slots == j), f"object {o}: slot {j} cannot hold frame {f}")
        feat = idx = None
        if n:
            feat = arr.take(f"{key}.slot{j}.feat", "<u2", (n, mem_dim))
            idx = arr.take(f"{key}.slot{j}.idx", "<i4", (n,))
            _need(int(idx.min()) >= 0 and int(idx.max()) < T and np.unique(idx).size == n,
                  f"object {o}: slot {j}'s token indices must be distinct, in 0..{T - 1}")
        op["slots"].append((j, f, n, feat, idx))
    v = e.get("ptrs", [])
    _need(isinstance(v, list) and len(v) <= ptr_slots, f"object {o}'s ptrs must be a list of at most {ptr_slots}")
    seen = set()
    for item in v:
        _need(isinstance(item, list) and len(item) == 2 and _int(item[0], 0, ptr_slots - 1) and item[0] not in seen
              and _int(item[1], -1, last) and (item[1] < 0 or item[1] % ptr_slots == item[0]),
              f"object {o}: a pointer slot is [slot, frame]")
        seen.add(item[0])
    rows = arr.take(f"{key}.ptr", "<f4", (len(v), hidden)) if v else None
    op["ptrs"] = [(p, f, rows[i]) for i, (p, f) in enumerate(v)]
    op["cond"] = None
    if "cond" in e:
        v = e["cond"]
        _need(isinstance(v, list) and len(v) <= s.max_cond_frames and len(set(map(str, v))) == len(v)
              and all(_int(f, 0, last) for f in v), f"object {o}'s cond must be at most "
              f"{s.max_cond_frames} distinct frames")
        ptrs = arr.take(f"{key}.cond_ptr", "<f4", (len(v), hidden)) if v else None
        op["cond"] = [(f, arr.take(f"{key}.cond{i}.feat", "<u2", (T, mem_dim)), ptrs[i]) for i, f in enumerate(v)]
    _need(not new or op["cond"], f"new object {o} has no conditioning frame")
    return op


def apply_plan(s, plan: dict) -> None:
    """A checked plan into the session (cannot fail on a plan from plan_blob)."""
    rev = plan["rev"]
    s._clock.now = rev  # what the restored trackers and banks record as their last change
    trackers, starts = {}, {}
    for o, op in plan["objects"].items():
        if op["new"]:
            tr = s.make_tracker(num_frames=None if s.num_frames is None else s.num_frames - op["start"])
        else:
            tr = s._trackers[o]
        _apply_object(tr, op, rev)
        trackers[o], starts[o] = tr, op["start"]
    s._trackers, s._start = trackers, starts
    s._frame, s._size, s._removals = plan["frame"], plan["size"], plan["removals"]
    if plan["pending"] is not None:
        s._pending, s._pending_rev = plan["pending"], rev
    f = plan["log_from"]
    s.prompt_log[f:] = [dict(x) for x in plan["log"]]
    s._log_revs[f:] = [rev] * len(plan["log"])
    if plan["full"]:
        s._log_reset_rev = rev
    s._stream, s._pushed = plan["stream"], None


def _apply_object(tr, op: dict, rev: int) -> None:
    b = tr.bank
    if "frame_idx" in op:
        tr.frame_idx = op["frame_idx"]
        tr.prev_logits = None if op["logits"] is None else np.array(op["logits"])
        tr.prev_grid = None if op["grid"] is None else np.array(op["grid"])
        if "budget" in op:
            tr.budget.last_motion = op["budget"][0]
            tr.budget.prev = None if op["budget"][1] is None else np.array(op["budget"][1])
        tr.state_rev = rev
    if "text" in op:
        tr.set_text(np.array(op["text"]))
    for j, f, n, feat, idx in op["slots"]:
        b.frame[j], b.count[j], b.slot_rev[j] = f, n, rev
        if n:
            b.feat[j, :n] = feat
            b.idx[j, :n] = idx
    for p, f, row in op["ptrs"]:
        b.ptr[p], b.ptr_frame[p], b.ptr_rev[p] = row, f, rev
    if op["cond"] is not None:
        b.cond = [(f, np.array(feat), np.array(ptr, np.float32)) for f, feat, ptr in op["cond"]]
        b.cond_rev = rev
    tr._last_frame = None
