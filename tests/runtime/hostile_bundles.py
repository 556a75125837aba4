"""Hostile and damaged bundles for the hardening tests: clones of the session's tiny bundle
whose big files are hard links (every change replaces a file, a new inode, never writes into
one), the edits the cases make, and the reseal that makes the check under test, not the seal,
the thing that refuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from fastsam2.runtime.bundle_files import seal_digest


def clone(src: Path, dst: Path) -> Path:
    for p in sorted(src.rglob("*")):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        if p.name == "manifest.json":
            shutil.copyfile(p, q)
        else:
            try:
                os.link(p, q)
            except OSError:
                shutil.copyfile(p, q)
    return dst


def manifest_of(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def write_manifest(b: Path, m: dict, seal: bool = True) -> None:
    """m as manifest.json; with seal, sealed as export would (file hashes from m's own seal)."""
    if seal:
        m["seal"]["sha256"] = seal_digest(m, m["seal"]["files"])
    (b / "manifest.json").unlink()
    (b / "manifest.json").write_text(json.dumps(m))


def put(b: Path, m: dict, rel: str, data: bytes) -> None:
    """Replace a bundle file (a new inode: the clone's files are links to the session bundle)
    and record its hash where the manifest and the seal name it."""
    f = b / rel
    if f.exists() or f.is_symlink():
        f.unlink()
    f.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    m["seal"]["files"][rel] = digest
    for entry in [m["constants"], m["text"], *m["graphs"].values()]:
        if entry["file"] == rel:
            entry["sha256"] = digest


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def constants_of(b: Path) -> dict:
    with np.load(b / "constants.npz") as z:
        return {k: z[k] for k in z.files}


def bomb_npz(good: dict) -> bytes:
    """vision_pos's header declares 2**40 floats; the member holds a few bytes."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in good.items():
            member = io.BytesIO()
            if k == "vision_pos":
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "<f4", "fortran_order": False, "shape": (1 << 20, 1 << 20)})
                member.write(b"\0" * 64)
            else:
                np.lib.format.write_array(member, v)
            z.writestr(f"{k}.npy", member.getvalue())
    return buf.getvalue()


def external_data_onnx(outside: Path) -> bytes:
    """A tiny valid graph whose weight lives in a file outside the bundle."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", str(outside / "weights.bin")), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [t])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def nested(n: int):
    v = 0
    for _ in range(n):
        v = [v]
    return v


def set_key(path: str, value):
    def edit(m, b, out):
        *head, last = path.split(".")
        d = m
        for k in head:
            d = d[k]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value(out) if callable(value) else value
    return edit


DELETE = object()
SHA = "0" * 64


def engines_section(info):
    return set_key("engines", info)


def writes_raw(fn):
    """A case that writes manifest.json's bytes itself (no reseal)."""
    fn.raw = True
    return fn


def not_resealed(fn):
    fn.unsealed = True
    return fn


def symlink_graph(m, b, out):
    (b / "router.onnx").unlink()
    (b / "router.onnx").symlink_to(out / "router.onnx")  # same bytes: the hash matches


@writes_raw
def symlink_manifest(m, b, out):
    (out / "manifest.json").write_text(json.dumps(m))
    (b / "manifest.json").unlink()
    (b / "manifest.json").symlink_to(out / "manifest.json")


def symlink_engines(m, b, out):
    (out / "engines").mkdir(exist_ok=True)
    (b / "engines").symlink_to(out / "engines")


def device_engines(m, b, out, record=None, link=None):
    m["engines"] = {"target": "jetson-orin", "keep_range": [0.3, 1.0], "built": False}
    d = b / "engines" / "jetson-orin"
    d.mkdir(parents=True)
    if record is not None:
        (d / "engines.json").write_text(json.dumps(record))
    if link is not None:
        (d / link).symlink_to(out / "router.onnx")


def edit_constants(edit):
    def case(m, b, out):
        c = constants_of(b)
        edit(c)
        put(b, m, "constants.npz", npz_bytes(**c))
    return case


def replace_file(rel, data):
    def case(m, b, out):
        put(b, m, rel, data(b, out) if callable(data) else data)
    return case


def graph_is_folder(m, b, out):
    (b / "router.onnx").unlink()
    (b / "router.onnx").mkdir()


def unsealed_graph(m, b, out):
    shutil.copyfile(b / "router.onnx", b / "router2.onnx")
    m["graphs"]["router"]["file"] = "router2.onnx"


def raw_manifest(text):
    def case(m, b, out):
        raw = text(json.dumps(m)) if callable(text) else text
        (b / "manifest.json").unlink()
        (b / "manifest.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    case.raw = True
    return case


# (name, mutation, words the one-line error must hold)

def outside_files(out: Path, bundle_dir: Path) -> Path:
    """Files outside every bundle that the cases point at: valid copies of bundle files, so
    that only the path checks stand between them and the runtime."""
    for name in ("router.onnx", "constants.npz", "text_embeddings.npz", "manifest.json"):
        shutil.copyfile(bundle_dir / name, out / name)
    (out / "x.engine").write_bytes(b"engine")
    (out / "weights.bin").write_bytes(b"\0" * 16)
    return out


def make_case(cases, bundle_dir: Path, root: Path, outside: Path, i: int) -> tuple:
    """Case i of `cases` ((name, mutation, words)) as a bundle under root; (bundle, words)."""
    name, mutate, words = cases[i]
    b = clone(bundle_dir, root / f"b{i:03d}")
    m = manifest_of(b)
    mutate(m, b, outside)
    if not getattr(mutate, "raw", False):
        write_manifest(b, m, seal=not getattr(mutate, "unsealed", False))
    return b, words
