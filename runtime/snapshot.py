"""Session snapshots: the state a stream needs to go on elsewhere, exactly. Torch-free.

    data = session.snapshot()                        # everything the next push depends on
    s2 = Session.restore(bundle, data)               # or Session.open(bundle, ..., snapshot=data)
    s2.push(next_frame)                              # == the uninterrupted session's result

    blob = session.snapshot_delta()                  # per frame: the first call a full snapshot,
                                                     # then only what changed since the last call
    s3 = Session.restore(bundle, [full, *increments])

Format (version 1): the safetensors layout (runtime/snapshot_format.py), no pickle. The JSON
state under "__metadata__" -> "fastsam2":
  format "fastsam2-session", version 1, kind "full" | "increment", stream (an id per session
  chain), rev (the session's change counter when written), since (increment: the revision it
  starts after), bundle_seal (the bundle's seal digest), geometry (image size, tokens, bank
  widths: the bundle's), settings (keep, keep_floor, keep_range, fill, num_frames,
  max_cond_frames, correct_as_cond, frame_size), frame (last frame pushed), size ([w, h]),
  removals ([[frame, object]]), pending (prompts for later frames, or null: unchanged),
  log {from, entries} (prompt_log from index `from`), objects {id: entry}.
An object entry: start (its first frame), new (true: the whole object follows), and what
changed: frame_idx (its own frame counter) + logits (previous mask logits) + grid ("last"
fill) + budget (--keep auto: motion and previous features); text (the router's text
embedding); slots [[ring slot, frame, kept tokens]] with arrays o<id>.slot<j>.feat (BF16
[n, mem_dim]) and .idx (I32 [n]); ptrs [[slot, frame]] with o<id>.ptr (F32 [n, hidden]);
cond (conditioning frames, in order) with o<id>.cond<i>.feat (BF16 [T, mem_dim]) and
o<id>.cond_ptr. An object absent from `objects` is gone.
A tracked frame changes one ring slot, one pointer slot and the logits of each object, so an
increment is about one memory entry per object; a prompt adds the conditioning frames.

Restoring checks the whole chain before anything changes: the bundle seal and geometry
(BundleError), the settings, the chain (an increment applies to a state at a revision in
[since, rev] of the same stream), every array's dtype and shape against the bundle, every
index and counter: anything else is one InputError (SnapshotError).
A snapshot does not hold the last frame's image features: a correction of that frame after a
restore is refused; prompts on later frames are not.
"""

from __future__ import annotations

import bisect
import secrets

import numpy as np

from .errors import BundleError, InputError
from .snapshot_format import SnapshotError, _int, header_meta, pack, read_bytes, unpack
from .snapshot_restore import apply_plan, plan_blob

FORMAT, VERSION = "fastsam2-session", 1
SETTING_NAMES = ("keep", "fill", "num_frames", "max_cond_frames", "correct_as_cond", "frame_size")


class Snapshots:
    """Session's snapshot methods (mixed into runtime.session.Session)."""

    def snapshot(self, since: int | None = None) -> bytes:
        """Everything the next push depends on, as bytes (no pickle), bound to the bundle's seal
        and this session's settings. `since`: only what changed after that revision (an
        increment; `revision` of an earlier state)."""
        self._check_open()
        return write_snapshot(self, since)

    def snapshot_delta(self, full: bool = False) -> bytes:
        """What changed since the previous snapshot_delta(): the first call (and the first after
        reset() or a restore of a full snapshot elsewhere) gives a full snapshot, the next ones
        increments. A store keeps the last full one plus the increments after it; `full` starts
        a new chain (a store that drops the old one)."""
        data = self.snapshot(None if full else self._delta_rev)
        self._delta_rev = self._clock.now
        return data

    def restore_state(self, snapshot) -> None:
        """Replace this session's state with a snapshot's (bytes, a path, or [full, *increments]);
        an increment alone applies on top of the current state. Checked whole first: nothing
        changes on an error."""
        self._check_open()
        restore_into(self, snapshot)
        self._delta_rev = self._clock.now

    @classmethod
    def restore(cls, bundle, snapshot, **kw):
        """A session of `bundle` from `snapshot` (as restore_state), opened with the settings the
        snapshot was taken with; `kw` as for open() (backend, threads, graphs, warn); a setting
        given must match the snapshot's."""
        return cls.open(bundle, **{**snapshot_settings(snapshot), **kw}, snapshot=snapshot)

    @property
    def revision(self) -> int:
        """The session's change counter (each push, prompt, removal or reset advances it)."""
        return self._clock.now


def new_stream_id() -> str:
    return secrets.token_hex(8)


# -- what a session is bound to -----------------------------------------------------------------
def _seal(s):
    return ((getattr(getattr(s, "bundle", None), "manifest", None) or {}).get("seal") or {}).get("sha256")


def _geometry(s) -> dict:
    st = s.settings
    return {"image_size": int(s.S), "tokens": int(s.T), "num_maskmem": int(st["num_maskmem"]),
            "mem_dim": int(st["mem_dim"]), "hidden_dim": int(st["hidden_dim"]),
            "max_obj_ptrs_in_encoder": int(st["max_obj_ptrs_in_encoder"]), "text_dim": int(st.get("text_dim", 512)),
            "feat_dim": int(np.asarray(s.constants["no_mem_embed"]).size)}


def _settings(s) -> dict:
    return {"keep": s.keep if s.keep == "auto" else float(s.keep), "keep_floor": int(s.keep_floor),
            "keep_range": [float(x) for x in s.keep_range], "fill": s.fill, "num_frames": s.num_frames,
            "max_cond_frames": int(s.max_cond_frames), "correct_as_cond": s.correct_as_cond,
            "frame_size": [int(v) for v in s._expected_size] if s._expected_size else None}


# -- writing ------------------------------------------------------------------------------------
def write_snapshot(s, since: int | None) -> bytes:
    if since is not None and not _int(since, 0, s._clock.now):
        raise InputError(f"since must be a revision of this session (0..{s._clock.now}), got {since!r}")
    R = -1 if since is None else since
    arrays, objects = {}, {}
    for o, tr in sorted(s._trackers.items()):
        objects[str(o)] = {"start": int(s._start[o]), **_write_object(tr, f"o{o}", R, arrays, s.fill)}
    pending = None
    if R < 0 or s._pending_rev > R:
        pending = []
        for f in sorted(s._pending):
            for o, spec in sorted(s._pending[f].items()):
                if spec.mask is not None:
                    arrays[f"pending{len(pending)}.mask"] = ("BOOL", spec.mask)
                pending.append({"frame": f, "object": o, "text": spec.text, "points": [list(p) for p in spec.points],
                                "neg_points": [list(p) for p in spec.neg_points],
                                "box": None if spec.box is None else list(spec.box), "mask": spec.mask is not None})
    log_from = 0 if R < 0 or s._log_reset_rev > R else bisect.bisect_right(s._log_revs, R)
    meta = {"format": FORMAT, "version": VERSION, "kind": "full" if R < 0 else "increment",
            "since": None if R < 0 else R, "rev": s._clock.now, "stream": s._stream,
            "bundle_seal": _seal(s), "geometry": _geometry(s), "settings": _settings(s),
            "frame": s._frame, "size": list(s._size) if s._size else None,
            "removals": sorted([f, o] for f, objs in s._removals.items() for o in objs),
            "pending": pending, "log": {"from": log_from, "entries": s.prompt_log[log_from:]}, "objects": objects}
    return pack(meta, arrays)


def _write_object(tr, key: str, R: int, arrays: dict, fill: str) -> dict:
    new = R < 0 or tr.created_rev > R
    b, e = tr.bank, {"new": new}
    if new or tr.state_rev > R:
        e["frame_idx"] = int(tr.frame_idx)
        e["logits"] = tr.prev_logits is not None
        if e["logits"]:
            arrays[f"{key}.logits"] = ("F32", tr.prev_logits)
        e["grid"] = fill == "last" and tr.prev_grid is not None
        if e["grid"]:
            arrays[f"{key}.grid"] = ("F32", tr.prev_grid)
        if tr.adaptive:
            e["budget"] = {"motion": float(tr.budget.last_motion), "prev": tr.budget.prev is not None}
            if tr.budget.prev is not None:
                arrays[f"{key}.budget_prev"] = ("F32", tr.budget.prev)
    if new or tr.text_rev > R:
        e["text"] = True
        arrays[f"{key}.text"] = ("F32", tr.text_emb)
    e["slots"] = []
    for j in range(len(b.frame)):
        if (b.frame[j] >= 0) if new else (b.slot_rev[j] > R):
            n = int(b.count[j])
            e["slots"].append([j, int(b.frame[j]), n])
            if n:
                arrays[f"{key}.slot{j}.feat"] = ("BF16", b.feat[j, :n])
                arrays[f"{key}.slot{j}.idx"] = ("I32", b.idx[j, :n])
    e["ptrs"] = [[p, int(b.ptr_frame[p])] for p in range(len(b.ptr_frame))
                 if ((b.ptr_frame[p] >= 0) if new else (b.ptr_rev[p] > R))]
    if e["ptrs"]:
        arrays[f"{key}.ptr"] = ("F32", b.ptr[[p for p, _ in e["ptrs"]]])
    if new or b.cond_rev > R:
        e["cond"] = [int(f) for f, _, _ in b.cond]
        for i, (_, feat, _) in enumerate(b.cond):
            arrays[f"{key}.cond{i}.feat"] = ("BF16", feat)
        if b.cond:
            arrays[f"{key}.cond_ptr"] = ("F32", np.stack([p for _, _, p in b.cond]))
    return e


# -- reading ------------------------------------------------------------------------------------
def _blobs(source) -> list:
    if isinstance(source, (list, tuple)):
        if not source:
            raise SnapshotError("an empty list is not a snapshot")
        return [read_bytes(x) for x in source]
    return [read_bytes(source)]


def snapshot_settings(source) -> dict:
    """The session settings a snapshot (or the first of a chain) was taken with, as open() kwargs."""
    first = _blobs(source)[0]
    meta = header_meta(first)[0]
    _check_format(meta)
    st = meta.get("settings")
    if not isinstance(st, dict):
        raise SnapshotError("snapshot has no settings")
    out = {k: st.get(k) for k in SETTING_NAMES}
    fs, nf = out["frame_size"], out["num_frames"]
    # the rest (keep, fill, max_cond_frames) is checked by Session itself, as any caller's
    if not (fs is None or (isinstance(fs, list) and len(fs) == 2 and all(_int(v, 2, 1 << 15) for v in fs))):
        raise SnapshotError("snapshot settings: frame_size must be null or [width, height]")
    if not (nf is None or _int(nf, 1, 1 << 53)) or out["correct_as_cond"] not in (None, True, False):
        raise SnapshotError("snapshot settings: num_frames must be null or an integer >= 1, correct_as_cond "
                            "null or a boolean")
    out["frame_size"] = None if fs is None else tuple(fs)
    return out


def snapshot_info(data) -> dict:
    """kind ("full" | "increment"), rev, since, stream and frame of a snapshot, from its header
    alone: what a store needs to keep a chain (replace on full, append on increment)."""
    meta = header_meta(read_bytes(data))[0]
    _check_format(meta)
    return {k: meta.get(k) for k in ("kind", "rev", "since", "stream", "frame")}


def _check_format(meta: dict) -> None:
    if meta.get("format") != FORMAT:
        raise SnapshotError("not a fastsam2 session snapshot")
    if meta.get("version") != VERSION:
        raise SnapshotError(f"snapshot format version {str(meta.get('version'))[:20]}; this fastsam2 reads "
                            f"version {VERSION}")


def _check_identity(s, meta: dict) -> None:
    _check_format(meta)
    seal = _seal(s)
    if meta.get("bundle_seal") != seal:
        theirs = str(meta.get("bundle_seal"))[:12]
        raise BundleError(f"the snapshot is of another bundle (seal {theirs}...), this session's is "
                          f"{str(seal)[:12]}...: restore it with the bundle it was taken with")
    if meta.get("geometry") != _geometry(s):
        raise BundleError("the snapshot's model geometry differs from this bundle's")
    theirs, ours = meta.get("settings"), _settings(s)
    if not isinstance(theirs, dict):
        raise SnapshotError("snapshot has no settings")
    for k, v in ours.items():
        if theirs.get(k) != v:
            raise SnapshotError(f"the snapshot was taken with {k} {str(theirs.get(k))[:30]}, this session has "
                                f"{k} {v}: open the session with the snapshot's settings (Session.restore)")


def restore_into(s, source) -> None:
    blobs = _blobs(source)
    state = {"objects": set(s._trackers), "starts": dict(s._start), "rev": s._clock.now, "log": len(s.prompt_log), "stream": s._stream}
    plans = []
    for i, data in enumerate(blobs):
        meta, arrays = unpack(data)
        _check_identity(s, meta)
        plans.append(plan_blob(s, meta, arrays, state, first=i == 0, chain=len(blobs) > 1))
    for p in plans:
        apply_plan(s, p)
