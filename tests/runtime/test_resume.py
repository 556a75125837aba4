"""fastsam2-run --checkpoint-every N / --resume (issue 22, section 2): a run SIGKILLed after a
checkpoint and resumed gives the masks of a run never interrupted, byte for byte, and one complete
results.json; a resume of another run, a damaged checkpoint or a live source is one line, exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fastsam2.runtime.errors import InputError
from fastsam2.runtime.prompts import PromptSpec
from fastsam2.runtime.resume import (
    CHECKPOINT_NAME,
    MAGIC,
    ResumeError,
    check_flags,
    check_identity,
    decode,
    encode,
    owned_files,
    read_checkpoint,
    schedule_digest,
    write_checkpoint,
)
from fastsam2.runtime.track import Scheduled, as_schedule


def _state(n=2, **kw):
    ident = {"input": {"path": "/v.mp4", "kind": "video", "content": 10, "frames": 9, "width": 160,
                       "height": 120, "fps": 24.0},
             "bundle_seal": "ab" * 32, "keep": 0.5, "fill": "no_mem", "max_cond_frames": 4, "schedule": "x"}
    st = {"next": n, "every": 2, "identity": ident, "frames": [{"frame": i} for i in range(n)],
          "files": {f"masks/{i:05d}.png": [1, 2] for i in range(n)}, "frames_sha256": "h", "seconds": 1.5}
    st.update(kw)
    return st


# -- the file ---------------------------------------------------------------------------------------
def test_checkpoint_round_trips_and_any_cut_or_edit_is_one_error(tmp_path):
    snap = bytes(range(256)) * 4
    write_checkpoint(tmp_path, _state(), snap)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp file left
    ck = read_checkpoint(tmp_path)
    assert ck.snapshot == snap and ck.next == 2 and ck.state["frames"] == [{"frame": 0}, {"frame": 1}]
    data = (tmp_path / CHECKPOINT_NAME).read_bytes()
    for bad in (data[:-1], data[:100], data[: len(data) // 2], data[:len(MAGIC)],
                data.replace(b'"next":2', b'"next":3'), data[:-40] + bytes([data[-40] ^ 1]) + data[-39:]):
        with pytest.raises(ResumeError, match="damaged"):
            decode(bad, "ck")
    with pytest.raises(ResumeError, match="not a fastsam2 checkpoint"):
        decode(b"PK\x03\x04" + data[4:], "ck")
    with pytest.raises(ResumeError, match="another fastsam2 version"):
        decode(MAGIC[:-1] + b"\x07" + data[len(MAGIC):], "ck")


@pytest.mark.parametrize("edit", [
    {"next": "2"}, {"next": 0}, {"every": 0}, {"frames": [{"frame": 0}]}, {"frames": "no"},
    {"files": {"../x.png": [1, 2]}}, {"files": {"masks/00000.png": [1, -2]}}, {"identity": {"input": {}}},
    {"seconds": True}, {"frames_sha256": None},
])
def test_a_checksummed_but_hostile_state_is_refused_in_one_line(tmp_path, edit):
    # anyone can compute a sha256: the fields are checked, never trusted into a traceback
    with pytest.raises(ResumeError, match="not a checkpoint this fastsam2 can resume from"):
        decode(encode(_state(**edit), b"snap"), "ck")
    body = MAGIC + struct.pack("<Q", 3) + b"[1]"
    with pytest.raises(ResumeError, match="can resume from"):
        decode(body + hashlib.sha256(body).digest(), "ck")
    body = MAGIC + struct.pack("<Q", 2**63) + b"{}"  # a declared size past the file
    with pytest.raises(ResumeError, match="damaged"):
        decode(body + hashlib.sha256(body).digest(), "ck")


def test_no_checkpoint_is_one_line(tmp_path):
    with pytest.raises(ResumeError, match="holds no checkpoint"):
        read_checkpoint(tmp_path / "nowhere")
    (tmp_path / CHECKPOINT_NAME).mkdir()
    with pytest.raises(ResumeError, match="is not a file"):
        read_checkpoint(tmp_path)


# -- what the folder's checkpoint vouches for -------------------------------------------------------------
def test_owned_files_are_the_covered_masks_and_later_masks_written_after_it(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        (masks / f"{i:05d}.png").write_bytes(b"m" * (i + 1))
    old = masks / "00007.png"
    old.write_bytes(b"old")
    os.utime(old, ns=(10**9, 10**9))  # older than the checkpoint: not vouched for
    st = {f"masks/{i:05d}.png": [i + 1, os.lstat(masks / f"{i:05d}.png").st_mtime_ns] for i in range(2)}
    write_checkpoint(tmp_path, _state(files=st), b"s")
    (masks / "00004.png").write_bytes(b"later")  # after the checkpoint, past its frames: the killed run's
    owned = owned_files(tmp_path)
    assert sorted(owned) == [CHECKPOINT_NAME, "masks/00000.png", "masks/00001.png", "masks/00004.png"]
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"junk")
    assert owned_files(tmp_path) == {}


# -- what a run is ----------------------------------------------------------------------------------------
def test_schedule_digest_tells_schedules_apart():
    a = as_schedule([Scheduled(0, 1, PromptSpec(points=[(10, 20)])), Scheduled(5, 2, PromptSpec(text="cyclist"))])
    same = as_schedule([Scheduled(5, 2, PromptSpec(text="cyclist")), Scheduled(0, 1, PromptSpec(points=[(10.0, 20.0)]))])
    assert schedule_digest(a) == schedule_digest(same)
    for other in ([Scheduled(0, 1, PromptSpec(points=[(10, 21)])), Scheduled(5, 2, PromptSpec(text="cyclist"))],
                  [Scheduled(0, 1, PromptSpec(points=[(10, 20)])), Scheduled(6, 2, PromptSpec(text="cyclist"))],
                  [Scheduled(0, 1, PromptSpec(points=[(10, 20)]))],
                  [Scheduled(0, 1, PromptSpec(points=[(10, 20)])), Scheduled(5, 2, PromptSpec(text="cyclist")),
                   Scheduled(7, 1, None)]):
        assert schedule_digest(as_schedule(other)) != schedule_digest(a)
    m = np.zeros((4, 4), bool)
    m2 = m.copy()
    m2[1, 1] = True
    assert (schedule_digest([Scheduled(0, 1, PromptSpec(mask=m))])
            != schedule_digest([Scheduled(0, 1, PromptSpec(mask=m2))]))


@pytest.mark.parametrize("change, words", [
    ({"input": {"path": "/w.mp4"}}, "was started on /v.mp4, not /w.mp4"),
    ({"input": {"content": 11}}, "changed since the checkpoint"),
    ({"bundle_seal": "cd" * 32}, "another bundle"),
    ({"keep": 1.0}, "used --keep 0.5, not 1.0"),
    ({"fill": "last"}, "--fill no_mem"),
    ({"max_cond_frames": 2}, "--max-cond-frames 4"),
    ({"schedule": "y"}, "prompts and removals differ"),
])
def test_another_run_is_refused(change, words):
    ck = SimpleNamespace(state=_state())
    ours = json.loads(json.dumps(ck.state["identity"]))
    for k, v in change.items():
        ours[k] = {**ours[k], **v} if isinstance(v, dict) else v
    with pytest.raises(ResumeError, match=words.replace("(", r"\(")):
        check_identity(ck, ours, "out")
    check_identity(ck, ck.state["identity"], "out")  # the same run: no error


@pytest.mark.parametrize("args, words", [
    (("v.mp4", 0, False), "--checkpoint-every must be an integer >= 1"),
    (("v.mp4", -3, False), "got '-3'"),
    (("v.mp4", True, False), "must be an integer"),
    (("v.mp4", 2.5, False), "must be an integer"),
    (("rtsp://127.0.0.1:1/x", None, True), "--resume needs a video file or a folder of frames"),
    (("/dev/video0", 3, False), "--checkpoint-every needs a video file or a folder"),
    (("http://127.0.0.1:1/x.mjpg", None, True), "cannot be read again"),
])
def test_flags_are_checked_before_anything_opens(args, words):
    with pytest.raises(InputError, match=words):
        check_flags(*args)
    with pytest.raises(InputError, match="needs --bundle"):
        check_flags("v.mp4", 3, False, remote=True)
    with pytest.raises(InputError, match="give one of them"):
        check_flags("v.mp4", None, True, force=True)
    check_flags("v.mp4", 3, False)
    check_flags(Path("frames"), None, True)
