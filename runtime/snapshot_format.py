"""The bytes of a session snapshot: the safetensors layout, written and read with numpy alone.

    u64 little-endian N | N bytes of JSON header | raw little-endian arrays, back to back

The header maps each array's name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
into the array bytes) and holds the session's state as a JSON string under
"__metadata__" -> "fastsam2". Any safetensors reader opens a snapshot (memory features are
declared BF16); fastsam2 reads it with its own parser because the bytes are untrusted: no
pickle, no compression (no zip bombs), the header is bounded before it is parsed, every array
must fill exactly the bytes its offsets claim and the arrays must tile the buffer with no
gap or overlap, so no declared size can make us allocate: arrays are views of the input.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct

import numpy as np

from .errors import InputError

META_KEY = "fastsam2"
MAX_HEADER_BYTES = 4 << 20  # JSON parsed into Python objects: bounded before parsing
# a full snapshot holds each object's bank (at 1024 px and keep 1.0 about 4 MB an object) and
# its prompts; 254 objects at 1024 px stay well under this
MAX_SNAPSHOT_BYTES = 2 << 30
DTYPES = {"BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "BF16": np.dtype("<u2"), "I32": np.dtype("<i4"),
          "I64": np.dtype("<i8"), "F32": np.dtype("<f4")}
MAX_DIMS = 4


class SnapshotError(InputError):
    """A snapshot that cannot be restored: not one, cut short, edited, or from elsewhere."""


def pack(meta: dict, arrays: dict) -> bytes:
    """meta: the state as JSON-able data; arrays: {name: (dtype tag, ndarray)}."""
    header, parts, offset = {}, [], 0
    for name, (tag, arr) in arrays.items():
        a = np.ascontiguousarray(arr, DTYPES[tag])
        raw = a.tobytes()
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        parts.append(raw)
        offset += len(raw)
    header["__metadata__"] = {META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(parts)


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: bytes | str, what: str):
    """Strict JSON (no NaN/Infinity) or one SnapshotError; nesting and huge numbers included."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SnapshotError(f"snapshot {what} is not valid JSON: {first}") from None


def read_bytes(source) -> bytes:
    """bytes-like, or a path to a regular file of at most MAX_SNAPSHOT_BYTES."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source) if not isinstance(source, bytes) else source
    elif isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise SnapshotError(f"snapshot {os.fspath(source)!r} is not a regular file")
                data = f.read(MAX_SNAPSHOT_BYTES + 1)
        except OSError as e:
            raise SnapshotError(f"cannot read snapshot {os.fspath(source)!r}: {e.strerror or e}") from None
    else:
        raise SnapshotError(f"a snapshot is bytes or a file path, got {type(source).__name__}")
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot is larger than {MAX_SNAPSHOT_BYTES >> 20} MB")
    return data


def _int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def header_meta(data: bytes) -> tuple:
    """(meta, header, body offset) from a snapshot's bytes, checked; arrays are not read."""
    if len(data) < 8:
        raise SnapshotError(f"snapshot is {len(data)} bytes: cut short (not a snapshot)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise SnapshotError(f"snapshot header declares {n} bytes, more than the {MAX_HEADER_BYTES >> 20} MB allowed")
    if 8 + n > len(data):
        raise SnapshotError(f"snapshot header declares {n} bytes, the snapshot has {len(data) - 8}: "
                            f"cut short or not a snapshot")
    header = parse_json(data[8:8 + n], "header")
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get(META_KEY), str):
        raise SnapshotError("not a fastsam2 snapshot (its header has no fastsam2 state)")
    state = parse_json(meta[META_KEY], "state")
    if not isinstance(state, dict):
        raise SnapshotError("snapshot state must be a JSON object")
    return state, header, 8 + n


def unpack(data: bytes) -> tuple:
    """(meta, {name: read-only ndarray view}) from a snapshot's bytes, or one SnapshotError."""
    meta, header, body = header_meta(data)
    size = len(data) - body
    spans, arrays = [], {}
    for name, d in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(d, dict) and set(d) == {"dtype", "shape", "data_offsets"} and d["dtype"] in DTYPES
                and isinstance(d["shape"], list) and len(d["shape"]) <= MAX_DIMS
                and all(_int(x, 0, 1 << 62) for x in d["shape"])
                and isinstance(d["data_offsets"], list) and len(d["data_offsets"]) == 2
                and all(_int(x, 0, 1 << 62) for x in d["data_offsets"])):
            raise SnapshotError(f"snapshot array {name[:40]!r} is described wrongly: {str(d)[:80]}")
        (b, e), dt = d["data_offsets"], DTYPES[d["dtype"]]
        if e > size:
            raise SnapshotError(f"snapshot array {name[:40]!r} lies at bytes {b}..{e} of {size}: cut short or edited")
        if e - b != math.prod(d["shape"]) * dt.itemsize:
            raise SnapshotError(f"snapshot array {name[:40]!r}: shape {str(d['shape'])[:40]} does not fill bytes {b}..{e}")
        spans.append((b, e, name))
        arrays[name] = (dt, d["shape"], b)
    end = 0
    for b, e, name in sorted(spans):
        if b != end:
            raise SnapshotError(f"snapshot arrays overlap or leave a gap at byte {end} ({name[:40]!r})")
        end = e
    if end != size:
        raise SnapshotError(f"snapshot holds {size} bytes of arrays, its header describes {end}: cut short or edited")
    out = {}
    for name, (dt, shape, b) in arrays.items():
        count = math.prod(shape)
        out[name] = (np.frombuffer(data, dt, count, body + b) if count else np.zeros(0, dt)).reshape(shape)
    return meta, out
