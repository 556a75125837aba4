"""Checkpoints of a long fastsam2-run, and resuming from one (issue 22, section 2). Torch-free.

    fastsam2-run VIDEO ... --out OUT --checkpoint-every N   # OUT/checkpoint.fastsam2 every N frames
    fastsam2-run VIDEO ... --out OUT --resume               # after Ctrl-C, SIGKILL or a power loss

A checkpoint is written once frame k's mask and every mask before it are durable (fsynced): it
covers exactly source frames 0..k. It names the run (input, bundle seal, keep, fill,
max_cond_frames, a digest of the prompt schedule) and holds the frames' results.json records, the
masks it covers with their [size, mtime_ns], a hash of the decoded frames it covers and the
session's snapshot (runtime/snapshot.py, which carries the prompt log). Resuming re-reads the
input (only files and frame folders can be), checks those frames against the hash while it
rebuilds overlay.mp4 from them and the masks on disk, then pushes the next frames into the
restored session: the outputs equal an uninterrupted run's. Masks a killed run wrote after its
last checkpoint (newer than it, of later frames) are its own and are replaced.

One file (MAGIC ends in the format version), written to a hidden temp name, fsynced, renamed:
    MAGIC (8 bytes) | u64 LE n | n bytes of JSON state | snapshot bytes | sha256 of all before it
JSON state: format, next (first source frame not covered), every, identity, frames (records),
files {"masks/NNNNN.png": [size, mtime_ns]}, frames_sha256, seconds (tracking time so far),
snapshot_bytes. No pickle; a cut or edited file fails the checksum: one line, nothing changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

CHECKPOINT_NAME = "checkpoint.fastsam2"
FORMAT, VERSION = "fastsam2-run-checkpoint", 1
MAGIC = b"FS2CKPT" + bytes([VERSION])
MAX_CHECKPOINT_BYTES = 4 << 30  # the snapshot (2 GiB at most, runtime/snapshot_format) + records
HEAD, DIGEST = len(MAGIC) + 8, 32  # bytes before the JSON state, of the trailing sha256
MASK_NAME = re.compile(r"(\d+)\.png")


class ResumeError(InputError):
    """No checkpoint to resume from, a damaged one, or one of another run."""


# -- flags --------------------------------------------------------------------------------------
def check_flags(input_path, checkpoint_every, resume: bool, *, remote: bool = False, force: bool = False) -> None:
    """--checkpoint-every (its bounds: track.check_run_limits) and --resume, before anything is opened."""
    from .live_target import live_target

    if not resume and checkpoint_every is None:
        return
    flag = "--resume" if resume else "--checkpoint-every"
    if resume and force:
        raise InputError("--resume continues the run in --out and --force replaces it: give one of them")
    if remote:
        raise InputError(f"{flag} needs --bundle: a run on a server (--server) cannot be checkpointed here")
    if live_target(input_path) is not None:
        raise InputError(f"{flag} needs a video file or a folder of frames: a camera or a stream cannot be "
                         "read again from its start, so a run on it cannot be resumed")


# -- what a run is --------------------------------------------------------------------------------
def schedule_digest(schedule) -> str:
    """sha256 of the prompt schedule (as track.as_schedule orders it) in canonical JSON."""
    items = []
    for s in schedule:
        spec = s.spec
        if spec is not None:
            mask = None
            if spec.mask is not None:
                m = np.ascontiguousarray(spec.mask, dtype=bool)
                mask = [list(m.shape), hashlib.sha256(m.tobytes()).hexdigest()]
            spec = {"text": spec.text, "points": [[float(v) for v in p] for p in spec.points],
                    "neg_points": [[float(v) for v in p] for p in spec.neg_points],
                    "box": None if spec.box is None else [float(v) for v in spec.box], "mask": mask}
        items.append([int(s.frame), int(s.obj), spec])
    return hashlib.sha256(json.dumps(items, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def input_identity(source) -> dict:
    """The input as the checkpoint names it: its resolved path and what can be read without
    decoding (the frames themselves are checked by hash when they are read again)."""
    path = Path(source.path).resolve()
    if source.kind == "folder":
        listing = [[p.name, (file_stamp(p) or [None])[0]] for p in source.files]
        content = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    else:
        content = os.stat(path).st_size
    return {"path": str(path), "kind": source.kind, "content": content, "frames": source.num_frames,
            "width": int(source.width), "height": int(source.height), "fps": round(float(source.fps), 6)}


def run_identity(source, bundle, keep, fill: str, max_cond_frames, schedule) -> dict:
    from .bank import DEFAULT_MAX_COND

    seal = ((bundle.manifest or {}).get("seal") or {}).get("sha256")
    return {"input": input_identity(source), "bundle_seal": seal, "keep": keep, "fill": fill,
            "max_cond_frames": int(DEFAULT_MAX_COND if max_cond_frames is None else max_cond_frames),
            "schedule": schedule_digest(schedule)}


class FrameHash:
    """A running sha256 of the decoded frames (shape and pixels), in order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, rgb: np.ndarray) -> None:
        a = np.ascontiguousarray(rgb)
        self._h.update(struct.pack("<4Q", a.ndim, *(list(a.shape) + [0] * 3)[:3]))
        self._h.update(a.view(np.uint8).reshape(-1).data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()  # hashlib's digest leaves the state as it was: updates go on


# -- the file -----------------------------------------------------------------------------------
def encode(state: dict, snapshot: bytes) -> bytes:
    state = {**state, "format": FORMAT, "snapshot_bytes": len(snapshot)}
    text = json.dumps(state, separators=(",", ":"), allow_nan=False).encode()
    body = MAGIC + struct.pack("<Q", len(text)) + text + snapshot
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, where: str) -> tuple:
    """(state, snapshot bytes) of a checkpoint file's bytes; ResumeError otherwise."""
    damaged = f"{where} is damaged (cut short or edited: its checksum does not match); start the run again with --force"
    if data[:len(MAGIC) - 1] != MAGIC[:-1]:
        raise ResumeError(f"{where} is not a fastsam2 checkpoint")
    if len(data) < HEAD + DIGEST:
        raise ResumeError(damaged)
    if data[len(MAGIC) - 1] != VERSION:
        raise ResumeError(f"{where} is a checkpoint of another fastsam2 version (format {data[len(MAGIC) - 1]}, "
                          f"this one reads {VERSION}); start the run again with --force")
    if hashlib.sha256(data[:-DIGEST]).digest() != data[-DIGEST:]:
        raise ResumeError(damaged)
    n = struct.unpack_from("<Q", data, len(MAGIC))[0]
    if n > len(data) - HEAD - DIGEST:
        raise ResumeError(damaged)
    try:
        state = json.loads(data[HEAD:HEAD + n])
    except (ValueError, RecursionError):
        raise ResumeError(damaged) from None
    snapshot = data[HEAD + n:-DIGEST]
    _check_state(state, len(snapshot), where)
    return state, snapshot


def _at_least(v, lo: int) -> bool:
    return type(v) is int and v >= lo


def _check_state(st, snapshot_bytes: int, where: str) -> None:
    """A checksummed file can still be hostile (anyone can compute a sha256): every field the
    resume reads has its type, or the file is refused."""
    def need(ok, what):
        if not ok:
            raise ResumeError(f"{where} is not a checkpoint this fastsam2 can resume from ({what})")

    need(isinstance(st, dict) and st.get("format") == FORMAT, "format")
    need(st.get("snapshot_bytes") == snapshot_bytes, "snapshot size")
    need(_at_least(st.get("next"), 1) and _at_least(st.get("every"), 1), "next frame, every")
    ident = st.get("identity")
    need(isinstance(ident, dict) and {"bundle_seal", "keep", "fill", "max_cond_frames", "schedule"} <= set(ident)
         and isinstance(ident.get("input"), dict), "identity")
    frames = st.get("frames")
    need(isinstance(frames, list) and len(frames) == st["next"] and all(  # what results.json sums up
        isinstance(f, dict) and f.get("frame") == i and isinstance(f.get("objects"), dict) and _at_least(
            f.get("kept_tokens"), 0) and type(f.get("frame_ms")) in (int, float) for i, f in enumerate(frames)),
        "frame records")
    files = st.get("files")
    need(isinstance(files, dict) and all(isinstance(k, str) and k.startswith("masks/") and MASK_NAME.fullmatch(k[6:])
                                         and isinstance(v, list) and len(v) == 2 and all(_at_least(x, 0) for x in v)
                                         for k, v in files.items()), "files")
    need(isinstance(st.get("frames_sha256"), str), "frame hash")
    need(isinstance(st.get("seconds"), (int, float)) and not isinstance(st.get("seconds"), bool), "seconds")


def file_stamp(path: Path):
    """[size, mtime_ns] of a regular file (not followed through a link), as runtime/run_folder records."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


@dataclass
class Checkpoint:
    state: dict
    snapshot: bytes
    stamp: list  # the checkpoint file's own [size, mtime_ns]

    next = property(lambda self: self.state["next"])
    files = property(lambda self: self.state["files"])


def read_checkpoint(folder) -> Checkpoint:
    """The checkpoint in an output folder; ResumeError (one line) when there is none or it is
    damaged. Nothing is allocated past the file's size, and that is bounded."""
    p = Path(folder) / CHECKPOINT_NAME
    try:
        st = os.lstat(p)
    except OSError:
        raise ResumeError(f"--resume: {folder} holds no checkpoint ({CHECKPOINT_NAME}) to continue from; a run "
                          "writes one every N frames with --checkpoint-every N") from None
    if not stat.S_ISREG(st.st_mode):
        raise ResumeError(f"{p} is not a file")
    if st.st_size > MAX_CHECKPOINT_BYTES:
        raise ResumeError(f"{p} is larger than a checkpoint can be ({MAX_CHECKPOINT_BYTES >> 30} GiB)")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CHECKPOINT_BYTES + 1)
    except OSError as e:
        raise ResumeError(f"cannot read {p}: {e.strerror or e}") from None
    state, snapshot = decode(data, str(p))
    return Checkpoint(state, snapshot, [st.st_size, st.st_mtime_ns])


def check_identity(ck: Checkpoint, ours: dict, out) -> None:
    """Refuse (one line) to continue the run in `out` with another input, bundle, setting or
    prompt schedule than it was started with."""
    theirs = ck.state["identity"]
    ti, oi = theirs["input"], ours["input"]
    if ti.get("path") != oi["path"]:
        raise ResumeError(f"--resume: the run in {out} was started on {ti.get('path')}, not {oi['path']}: "
                          "resume it with the same INPUT")
    changed = [k for k in ("kind", "content", "frames", "width", "height", "fps") if ti.get(k) != oi[k]]
    if changed:
        raise ResumeError(f"--resume: {oi['path']} changed since the checkpoint in {out} was written "
                          f"({', '.join(changed)} differ): the run cannot go on with other frames")
    if theirs["bundle_seal"] != ours["bundle_seal"]:
        raise ResumeError(f"--resume: the run in {out} used another bundle (seal {str(theirs['bundle_seal'])[:12]}..., "
                          f"this one's is {str(ours['bundle_seal'])[:12]}...): resume it with the same --bundle")
    for key, flag in (("keep", "--keep"), ("fill", "--fill"), ("max_cond_frames", "--max-cond-frames")):
        if theirs[key] != ours[key]:
            raise ResumeError(f"--resume: the run in {out} used {flag} {str(theirs[key])[:20]}, not {ours[key]}: "
                              f"resume it with {flag} {str(theirs[key])[:20]}")
    if theirs["schedule"] != ours["schedule"]:
        raise ResumeError(f"--resume: the prompts and removals differ from those the run in {out} was started with "
                          "(--prompt, --point, --neg-point, --box, --remove, --prompts-file): resume it with the same ones")


def write_checkpoint(folder, state: dict, snapshot: bytes) -> None:
    """Atomically and durably: a power loss leaves the previous checkpoint or this one."""
    from .errors import OutputError

    folder, data, tmp = Path(folder), encode(state, snapshot), None
    path = folder / CHECKPOINT_NAME
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_NAME}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_file(folder, folder=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def fsync_file(path, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some filesystems cannot fsync a folder: the rename is all they give
            raise
    finally:
        os.close(fd)


# -- what the folder's checkpoint vouches for (runtime/run_folder.RunFolder) ----------------------
def owned_files(folder) -> dict:
    """{relpath: [size, mtime_ns]} of the outputs a run stopped without its record (SIGKILL, a
    power loss) left, as the folder's checkpoint vouches for them: the checkpoint, the masks it
    covers, and the masks of later frames written after it. {} without a valid checkpoint."""
    folder = Path(folder)
    try:
        ck = read_checkpoint(folder)
    except ResumeError:
        return {}
    owned = {CHECKPOINT_NAME: ck.stamp, **ck.files}
    masks = folder / "masks"
    with contextlib.suppress(OSError):
        for e in os.listdir(masks):
            m = MASK_NAME.fullmatch(e)
            st = file_stamp(masks / e) if m and int(m[1]) >= ck.next else None
            if st is not None and st[1] >= ck.stamp[1]:
                owned[f"masks/{e}"] = st
    return owned


# -- the run loop's side (runtime/track._loop) -----------------------------------------------------
class Checkpoints:
    """A run's checkpoints: `replay` the frames a resumed run's checkpoint covers, `frame_done`
    after each frame's mask is written (a checkpoint every `every` frames), `finish` at the end."""

    def __init__(self, run, every: int | None, identity: dict, start: Checkpoint | None = None):
        self.run, self.identity, self.start = run, identity, start
        self.every = every if every is not None else (start.state["every"] if start else None)
        self.hash = FrameHash()
        self.files = dict(start.files) if start else {}
        self._unsynced: list = []  # masks written since the last checkpoint

    @property
    def next(self) -> int:
        """The first source frame the run still has to track."""
        return self.start.next if self.start else 0

    def frames(self) -> list:
        """results.json's records of the frames already done."""
        return [dict(f) for f in self.start.state["frames"]] if self.start else []

    def seconds(self) -> float:
        return float(self.start.state["seconds"]) if self.start else 0.0

    def replay(self, frames_iter, draw=None, progress=None, expected=None) -> None:
        """Read the covered frames again, hashed against the checkpoint and drawn into the overlay
        (`draw(rgb, index)`, with the masks on disk), before anything in the folder changes; then
        the outputs it does not cover are removed (the run writes them again)."""
        ck, where = self.start, self.run.path
        for rel, st in ck.files.items():
            if file_stamp(where / rel) != st:
                raise ResumeError(f"--resume: {where / rel} is missing or changed since the checkpoint was written; "
                                  "the run cannot go on from it: start it again with --force")
        for i in range(ck.next):
            frame = next(frames_iter, None)
            if frame is None:
                raise ResumeError(f"--resume: {self.identity['input']['path']} ended after {i} frames, the "
                                  f"checkpoint covers {ck.next}: it is not the input the run was started on")
            index, _, rgb = frame
            self.hash.update(rgb)
            if draw is not None:
                draw(rgb, index)
            if progress is not None:
                progress(i, expected, ck.state["frames"][i])
        if self.hash.hexdigest() != ck.state["frames_sha256"]:
            raise ResumeError(f"--resume: the first {ck.next} frames of {self.identity['input']['path']} differ "
                              "from those the run tracked: it is not the input the run was started on")
        self._remove_stale()

    def _remove_stale(self) -> None:
        # the interrupted run's results.json and overlay.mp4, and the masks it wrote after the
        # checkpoint: RunFolder accepted them as its own under the lock; this run writes them again
        folder = self.run.path
        stale = [folder / "results.json", folder / "overlay.mp4"]
        with contextlib.suppress(OSError):
            stale += [folder / "masks" / e for e in os.listdir(folder / "masks")
                      if (m := MASK_NAME.fullmatch(e)) and int(m[1]) >= self.next]
        for p in stale:
            if file_stamp(p) is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def frame_done(self, index: int, rgb, mask_path: Path, frames: list, session, seconds: float) -> None:
        """Frame `index`'s mask is written and its record is frames[-1]."""
        self.hash.update(rgb)
        self._unsynced.append(Path(mask_path))
        if self.every and len(frames) % self.every == 0:
            self.write(index + 1, frames, session, seconds)

    def write(self, next_frame: int, frames: list, session, seconds: float) -> None:
        # the masks it covers are durable before the checkpoint that names them
        for p in self._unsynced:
            fsync_file(p)
            self.files[f"masks/{p.name}"] = file_stamp(p)
        if self._unsynced:
            fsync_file(self._unsynced[0].parent, folder=True)
        self._unsynced = []
        state = {"next": next_frame, "every": self.every, "identity": self.identity, "frames": frames,
                 "files": self.files, "frames_sha256": self.hash.hexdigest(), "seconds": round(float(seconds), 3)}
        write_checkpoint(self.run.path, state, session.snapshot())

    def finish(self, status: str) -> None:
        """A finished run needs no checkpoint; a stopped or failed one keeps its last."""
        if status == "finished":
            with contextlib.suppress(FileNotFoundError):
                (self.run.path / CHECKPOINT_NAME).unlink()
