"""The files of a bundle, checked before anything reads them in earnest: every name resolves
inside the bundle folder, the seal over manifest and files holds, .npz members have the shapes
the manifest's geometry implies (read from their headers, before any array is allocated), and
each .onnx file is a well-formed ONNX protobuf that names no external data.

Nothing here is a signature: the seal catches a bundle changed after export (a hand-edited
manifest, a swapped graph), not one crafted whole by someone else. What keeps a crafted bundle
harmless is the rest: names inside the folder, bounded sizes, no external data.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from fastsam2.runtime.errors import BundleError

SEAL_KEY = "seal"


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# -- names -----------------------------------------------------------------------------------

def resolve_inside(root, rel, what: str = "file") -> Path:
    """`root / rel` when it stays inside `root` once every link is followed; BundleError
    otherwise (an absolute name, `..`, or a link out of the bundle). The path returned is the
    joined one, as the manifest spells it, so that messages show the user's names."""
    root = Path(root)
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise BundleError(f"bundle {root}: {what} name {rel!r} is not a relative path")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(f"bundle {root}: {what} {rel!r} points outside the bundle")
    joined = root.joinpath(*p.parts)
    try:
        real, base = joined.resolve(), root.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on Python < 3.13
        raise BundleError(f"bundle {root}: cannot resolve {what} {rel!r}: {e}") from None
    if real != base and base not in real.parents:
        raise BundleError(f"bundle {root}: {what} {rel!r} points outside the bundle (to {real})")
    return joined


def regular_file(root, rel, what: str = "file") -> Path:
    """resolve_inside, and the name must be a regular file (not a folder, fifo or device)."""
    f = resolve_inside(root, rel, what)
    if not f.is_file():
        raise BundleError(f"bundle file missing: {f}" if not f.exists() else
                          f"bundle {what} {f} is not a regular file")
    return f


# -- seal ------------------------------------------------------------------------------------

def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def seal_digest(manifest: dict, files: dict) -> str:
    """One digest over the manifest's content (its seal aside) and the sha256 of every sealed
    file: editing either changes it. Content, not bytes: re-indenting manifest.json does not."""
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    return hashlib.sha256(_canonical({"manifest": body, "files": dict(sorted(files.items()))})).hexdigest()


def sealed_names(root) -> list:
    """The files a seal covers: everything export wrote outside engines/, plus each target's
    build_plan.sh. engines/ is the device's workspace: engines, their engines.json, timing and
    calibration caches are written there after export and checked by their own hashes.
    openvino_cache/ (the precision gate's OpenVINO compiles, for the exporting CPU) is export's
    and sealed: a changed blob is a changed bundle. The runtime still treats a blob as input it
    may refuse (another OpenVINO or CPU, OpenVINO's own refusal): then it compiles, one line."""
    root = Path(root)
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts[:1] == ("engines",):
            if len(rel_dir.parts) == 2 and "build_plan.sh" in filenames:
                names.append(f"{rel_dir.as_posix()}/build_plan.sh")
            dirnames[:] = [] if len(rel_dir.parts) >= 2 else dirnames
            continue
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            if rel != "manifest.json":
                names.append(rel)
    return sorted(names)


def make_seal(root, manifest: dict) -> dict:
    """The seal of the bundle at `root` with this manifest content: {"format", "files", "sha256"}."""
    files = {rel: sha256_file(regular_file(root, rel, "sealed file")) for rel in sealed_names(root)}
    return {"format": 1, "files": files, "sha256": seal_digest(manifest, files)}


# -- .npz ------------------------------------------------------------------------------------

def npz_headers(path, max_members: int = 64, max_bytes: int = 1 << 31) -> dict:
    """{member: (shape, dtype)} of an .npz from each .npy header alone: np.load would allocate
    whatever shape a header declares before reading a byte of data."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > max_members:
                raise BundleError(f"{path} holds {len(infos)} arrays, more than {max_members}")
            for info in infos:
                if not info.filename.endswith(".npy") or info.file_size > max_bytes:
                    raise BundleError(f"{path}: member {info.filename!r} is not a bounded .npy array")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise BundleError(f"{path}: member {info.filename!r} has .npy format {version}")
                if dtype.hasobject:
                    raise BundleError(f"{path}: member {info.filename!r} holds Python objects")
                if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > info.file_size:
                    raise BundleError(f"{path}: member {info.filename!r} is shorter than its header says")
                out[info.filename[:-4]] = (tuple(shape), dtype)
    except BundleError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"cannot read {path}: {first[:200]}") from None
    return out


def check_npz(path, expected: dict, optional=(), what: str = "arrays") -> dict:
    """Headers of `path` against {name: (shape, dtype kind or dtype)}: every expected member
    present with that shape and dtype, optional ones right when present, nothing else."""
    got = npz_headers(path)
    for name, (shape, dtype) in expected.items():
        if name not in got:
            if name in optional:
                continue
            raise BundleError(f"{what} {path} lack {name!r}")
        gshape, gdtype = got[name]
        ok_dtype = gdtype.kind == dtype if isinstance(dtype, str) else gdtype == np.dtype(dtype)
        if gshape != tuple(shape) or not ok_dtype:
            want = "unicode" if dtype == "U" else np.dtype(dtype).name
            raise BundleError(f"{what} {path}: {name!r} is {gdtype} {gshape}; the manifest's model needs "
                              f"{want} {tuple(shape)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise BundleError(f"{what} {path} hold an unexpected array {extra[0]!r}")
    return got


# -- .onnx -----------------------------------------------------------------------------------

# Field numbers of onnx.proto's messages that can hold tensors or graphs: enough to reach
# every TensorProto (initializers, Constant attributes, subgraphs of If/Loop, functions).
_CHILDREN = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 3: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_MAX_NESTING = 64


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("a truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _walk(buf, pos: int, end: int, kind: str, depth: int) -> set:
    if depth > _MAX_NESTING:
        raise _Malformed("subgraphs nested too deeply")
    children, seen = _CHILDREN[kind], set()
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            if kind == "tensor" and field == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
                raise _Malformed("a tensor stored in an external file")
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed("a field longer than its message")
            if kind == "tensor" and field == _TENSOR_EXTERNAL_DATA:
                raise _Malformed("a tensor stored in an external file")
            if field in children:
                _walk(buf, pos, pos + n, children[field], depth + 1)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise _Malformed(f"wire type {wire}")
        seen.add(field)
    if pos != end:
        raise _Malformed("a field longer than its message")
    return seen


def check_onnx(path) -> None:
    """A well-formed ONNX ModelProto with a graph and every weight inside the file: external
    data would make ONNX Runtime open files the bundle does not name (older releases follow
    `../` there). Reads only the protobuf's framing, skipping weight bytes: ~0.1 s for the
    110 MB image encoder."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _Malformed("an empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                seen = _walk(mm, 0, size, "model", 0)
    except OSError as e:
        raise BundleError(f"cannot read graph {path}: {e.strerror or e}") from None
    except _Malformed as e:
        raise BundleError(f"graph {path} is not a valid ONNX model ({e}): export the bundle again") from None
    if 7 not in seen or 1 not in seen:
        raise BundleError(f"graph {path} is not a valid ONNX model (no graph or IR version): export the bundle again")


def describe_graph_error(path, exc: BaseException) -> BundleError:
    """ONNX Runtime's refusal to create a session for a bundle graph, as one BundleError line
    (for the backends to raise `from None`): its reason without source paths and C++ frames."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    text = " ".join(w for w in text.split() if not w.startswith("/onnxruntime_src"))
    if len(text) > 200:
        text = text[:199] + "…"
    return BundleError(f"ONNX Runtime cannot load graph {path}: {text or type(exc).__name__}; "
                       "export the bundle again")
