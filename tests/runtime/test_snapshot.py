"""Session snapshots (runtime/snapshot.py): a session restored from a snapshot, in this process
or another, or from a full snapshot plus its per-frame increments, pushes the same logits as
the session never interrupted; a snapshot of another bundle or settings, or a cut, edited or
hostile one, is one clear error that changes nothing and allocates nothing large."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tracemalloc
import types

import numpy as np
import pytest

from fastsam2.runtime.errors import BundleError, InputError
from fastsam2.runtime.snapshot_format import pack, unpack

FRAMES = 14
SNAP_AT = 8  # frames 0..8 pushed: past num_maskmem = 7, the ring has wrapped


@pytest.fixture(scope="module")
def graphs(bundle_dir):
    from fastsam2.runtime.backends import open_backend
    from fastsam2.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    return bundle, open_backend("ort-cpu", bundle, None, warn=lambda m: None)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from fastsam2.calibration.synthetic import make_video
    from official_stream import read_frames

    v = make_video(tmp_path_factory.mktemp("snapvid"), num_frames=FRAMES, size=(240, 320), seed=7, objects=2,
                   fmt="jpg")
    return read_frames(v.frames_dir_or_file)


def session(graphs, **kw):
    from fastsam2.runtime.session import Session

    bundle, g = graphs
    return Session.open(bundle, graphs=g, **kw)


def drive(s, frames, start, stop, out, deltas=None):
    """The scenario from frame `start` to `stop` (exclusive): object 1 clicked and object 3 boxed
    on 0, object 2 starts late (3), object 1 corrected on 5, object 3 removed on 6, prompts
    scheduled before the snapshot for after it (object 1 on 11, object 2 removed on 12).
    out[frame][obj] = logits; deltas: snapshot_delta() after each call, as a server stores."""
    def note():
        if deltas is not None:
            deltas.append(s.snapshot_delta())

    for t in range(start, stop):
        if t == 0:
            s.add_prompt(1, points=[(120, 100)])
            s.add_prompt(3, box=(200, 40, 300, 150))
        if t == 3:
            s.add_prompt(2, box=(20, 120, 140, 230))
        if t == 4:
            s.add_prompt(1, frame=11, points=[(150, 110)], neg_points=[(30, 30)])
            s.remove(2, frame=12)
            note()
        if t == 6:
            s.remove(3)
        r = s.push(frames[t])
        if t == 5:
            note()
            r = s.add_prompt(1, frame=5, points=[(130, 105)])
        out[t] = {o: r.objects[o].logits.copy() for o in r.objects}
        note()
    return out


def worst(a: dict, b: dict, frames) -> float:
    d = 0.0
    for f in frames:
        assert set(a[f]) == set(b[f]), (f, set(a[f]), set(b[f]))
        for o in a[f]:
            d = max(d, float(np.abs(a[f][o] - b[f][o]).max()))
    return d


@pytest.mark.parametrize("opts", [{"keep": 1.0}, {"keep": 0.3}, {"keep": "auto", "fill": "last"}],
                         ids=["keep1.0", "keep0.3", "auto-last"])
def test_restored_session_pushes_the_uninterrupted_logits(graphs, frames, opts):
    ref, deltas = {}, []
    with session(graphs, **opts) as s:
        drive(s, frames, 0, SNAP_AT + 1, ref, deltas)
        data = s.snapshot()
        full_at_snap = data
        drive(s, frames, SNAP_AT + 1, FRAMES, ref)
    assert set(ref[SNAP_AT]) == {1, 2} and set(ref[FRAMES - 1]) == {1}
    # a session restored from the bytes goes on exactly
    got = {}
    with session(graphs, **opts, snapshot=data) as r:
        assert r.frame == SNAP_AT and r.objects == [1, 2]
        drive(r, frames, SNAP_AT + 1, FRAMES, got)
    assert worst(ref, got, range(SNAP_AT + 1, FRAMES)) <= 1e-6
    # the first delta is a full snapshot, the next ones increments: together the same state
    from fastsam2.runtime.snapshot import snapshot_info

    kinds = [snapshot_info(d)["kind"] for d in deltas]
    assert kinds[0] == "full" and set(kinds[1:]) == {"increment"}
    from fastsam2.runtime.session import Session

    chained = Session.restore(graphs[0], deltas, graphs=graphs[1])
    assert chained.snapshot() == full_at_snap  # base + increments == the full snapshot, byte for byte
    got = {}
    drive(chained, frames, SNAP_AT + 1, FRAMES, got)
    assert worst(ref, got, range(SNAP_AT + 1, FRAMES)) <= 1e-6


def test_increment_is_one_memory_entry_per_object(graphs, frames):
    with session(graphs, keep=0.3) as s:
        drive(s, frames, 0, SNAP_AT, {})
        s.snapshot_delta()
        s.push(frames[SNAP_AT])
        inc, full = s.snapshot_delta(), s.snapshot()
    meta, arrays = unpack(inc)
    assert meta["kind"] == "increment" and set(meta["objects"]) == {"1", "2"}
    for e in meta["objects"].values():
        assert len(e["slots"]) == 1 and len(e["ptrs"]) == 1 and "cond" not in e and not e["new"]
    assert meta["pending"] is None and meta["log"]["entries"] == []
    assert len(inc) < 0.3 * len(full)


def test_restore_in_another_process(graphs, frames, bundle_dir, tmp_path):
    from conftest import THREADS  # the CPUs this worker may use (xdist pins each to its own)

    ref = {}
    with session(graphs, keep=0.3) as s:
        drive(s, frames, 0, SNAP_AT + 1, ref)
        (tmp_path / "s.snap").write_bytes(s.snapshot())
        drive(s, frames, SNAP_AT + 1, FRAMES, ref)
    np.save(tmp_path / "frames.npy", np.stack(frames))
    script = f"""
import sys, numpy as np
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from test_snapshot import drive
from fastsam2.runtime.session import Session
frames = list(np.load({str(tmp_path / 'frames.npy')!r}))
s = Session.restore({str(bundle_dir)!r}, {str(tmp_path / 's.snap')!r}, backend="ort-cpu", threads={THREADS}, warn=lambda m: None)
out = drive(s, frames, {SNAP_AT + 1}, {FRAMES}, {{}})
np.savez({str(tmp_path / 'got.npz')!r}, **{{f"{{f}}_{{o}}": v for f, d in out.items() for o, v in d.items()}})
assert "torch" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(tmp_path / "got.npz") as z:
        got = {}
        for k in z.files:
            f, o = map(int, k.split("_"))
            got.setdefault(f, {})[o] = z[k]
    assert worst(ref, got, range(SNAP_AT + 1, FRAMES)) <= 1e-6


@pytest.fixture(scope="module")
def snap(graphs, frames):
    with session(graphs, keep=0.3) as s:
        drive(s, frames, 0, SNAP_AT + 1, {})
        return s.snapshot()


def edited(data: bytes, meta_edit=None, array_edit=None) -> bytes:
    meta, arrays = unpack(data)
    tags = {np.dtype("<u2"): "BF16", np.dtype("<i4"): "I32", np.dtype("<f4"): "F32", np.dtype(bool): "BOOL"}
    arrays = {k: np.array(v) for k, v in arrays.items()}
    if meta_edit:
        meta_edit(meta)
    if array_edit:
        array_edit(arrays)
    return pack(meta, {k: (tags[v.dtype], v) for k, v in arrays.items()})


def _set(path, value):
    def edit(meta):
        d = meta
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


def _raw_header(data: bytes, fn) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = fn(json.loads(data[8:8 + n]))
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def _nan_rev(h):
    h["__metadata__"]["fastsam2"] = re.sub(r'"rev":\d+', '"rev":NaN', h["__metadata__"]["fastsam2"])
    return h


def _huge_shape(h):
    name = next(k for k in h if k.endswith(".feat"))
    h[name]["shape"] = [1 << 40, 64]
    return h


HOSTILE = {
    "empty": lambda d: b"",
    "cut in the header": lambda d: d[:40],
    "cut in the arrays": lambda d: d[:len(d) // 2],
    "a byte more": lambda d: d + b"\0",
    "header length 2**64-1": lambda d: b"\xff" * 8 + d[8:],
    "not json": lambda d: _raw_header(d, lambda h: b"{" * 100 + b" " * 4),
    "deep nesting": lambda d: _raw_header(d, lambda h: b"[" * 100000 + b"]" * 100000),
    "huge declared shape": lambda d: _raw_header(d, _huge_shape),
    "wrong dtype": lambda d: _raw_header(d, lambda h: {**h, **{k: {**v, "dtype": "U8", "shape": [v["data_offsets"][1] - v["data_offsets"][0]]}
                                                                for k, v in h.items() if k.endswith(".idx")}}),
    "NaN counter": lambda d: _raw_header(d, _nan_rev),
    "float frame": lambda d: edited(d, _set(["frame"], 8.0)),
    "frame far past": lambda d: edited(d, _set(["frame"], 10**30)),
    "other version": lambda d: edited(d, _set(["version"], 99)),
    "token index out of range": lambda d: edited(d, array_edit=lambda a: a["o1.slot1.idx"].__setitem__(0, 10**6)),
    "count past the tokens": lambda d: edited(d, lambda m: m["objects"]["1"]["slots"][0].__setitem__(2, 10**6)),
    "slot of another frame": lambda d: edited(d, lambda m: m["objects"]["1"]["slots"][0].__setitem__(1, 7)),
    "logits of another shape": lambda d: edited(d, array_edit=lambda a: a.__setitem__("o1.logits", np.zeros((1, 1, 8, 8), np.float32))),
    "extra array": lambda d: edited(d, array_edit=lambda a: a.__setitem__("x", np.zeros(3, np.float32))),
    "missing array": lambda d: edited(d, array_edit=lambda a: a.pop("o2.text")),
    "object id 999": lambda d: edited(d, lambda m: m["objects"].__setitem__("999", m["objects"].pop("1"))),
    "pending point outside": lambda d: edited(d, lambda m: m["pending"][0].__setitem__("points", [[1e9, 1]])),
    "pending points as text": lambda d: edited(d, lambda m: m["pending"][0].__setitem__("points", "abc")),
    "too many cond frames": lambda d: edited(d, lambda m: m["objects"]["1"].__setitem__("cond", list(range(100)))),
    "a million removals": lambda d: edited(d, _set(["removals"], [[20, 1]] * 1_000_000)),
    "an increment with no base": lambda d: edited(d, lambda m: m.update(kind="increment", since=0)),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_snapshot_is_one_clear_error(graphs, frames, snap, name):
    bad = HOSTILE[name](snap)
    with session(graphs, keep=0.3) as s:
        s.add_prompt(1, points=[(10, 10)])
        before = (s.revision, s.frame, s.objects, dict(s._pending))
        tracemalloc.start()
        try:
            with pytest.raises(InputError) as err:
                s.restore_state(bad)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        msg = str(err.value)
        assert "\n" not in msg and 0 < len(msg) < 300, msg
        assert peak < 64 << 20, peak  # nothing large allocated from a declared size
        assert (s.revision, s.frame, s.objects, dict(s._pending)) == before  # nothing changed
        s.push(frames[0])  # and the session still works


def test_snapshot_of_another_bundle_or_settings_is_refused(graphs, snap):
    from fastsam2.runtime.session import Session

    bundle, g = graphs
    with pytest.raises(InputError, match="taken with keep 0.3, this session has keep 1.0"):
        session(graphs, keep=1.0, snapshot=snap)
    with pytest.raises(InputError, match="fill"):
        session(graphs, keep=0.3, fill="last", snapshot=snap)
    with pytest.raises(InputError, match="max_cond_frames"):
        session(graphs, keep=0.3, max_cond_frames=2, snapshot=snap)
    other = Session(g[1], bundle.constants, bundle.settings, text_embeddings=bundle.text_embeddings, keep=0.3,
                    keep_range=(0.3, 1.0))
    other.bundle = types.SimpleNamespace(manifest={"seal": {"sha256": "0" * 64}})
    with pytest.raises(BundleError, match="another bundle"):
        other.restore_state(snap)
    # the snapshot's own settings open it; edited settings are refused as any caller's are
    assert Session.restore(bundle, snap, graphs=g).keep == 0.3
    for key, value in (("num_frames", "abc"), ("max_cond_frames", 10**6), ("fill", ["x"]), ("keep", 7)):
        with pytest.raises(InputError):
            Session.restore(bundle, edited(snap, _set(["settings", key], value)), graphs=g)


def test_broken_chain_is_refused(graphs, frames):
    with session(graphs, keep=0.3) as s:
        s.add_prompt(1, points=[(120, 100)])
        base = s.snapshot_delta()
        s.push(frames[0])
        d1 = s.snapshot_delta()
        s.push(frames[1])
        d2 = s.snapshot_delta()
    with pytest.raises(InputError, match="an increment is missing"):
        session(graphs, keep=0.3, snapshot=[base, d2])
    with session(graphs, keep=0.3) as other:
        other.add_prompt(1, points=[(120, 100)])
        other_base = other.snapshot_delta()
    with pytest.raises(InputError, match="another stream"):
        session(graphs, keep=0.3, snapshot=[other_base, d1])
    r = session(graphs, keep=0.3, snapshot=[base, d1, d2])
    assert r.frame == 1
    r.close()
    with pytest.raises(InputError, match="session is closed"):
        r.snapshot()


def test_a_correction_of_the_restored_frame_is_refused_clearly(graphs, frames, snap):
    with session(graphs, keep=0.3, snapshot=snap) as s:
        with pytest.raises(InputError, match="restored from a snapshot"):
            s.add_prompt(1, frame=SNAP_AT, points=[(100, 100)])
        s.add_prompt(1, frame=SNAP_AT + 1, points=[(100, 100)])  # the next frame is fine
        assert s.push(frames[SNAP_AT + 1]).objects[1].prompted
