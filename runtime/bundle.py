"""Read a bundle written by fastsam2-export, refusing one that changed, is from elsewhere, or
names anything outside its own folder.

load_bundle checks, in this order, before it allocates or loads anything the manifest sizes:
manifest.json's size and strict JSON, the fastsam2 version, the schema and its bounds
(manifest_schema), the seal over the manifest's content, that every file the manifest names
resolves inside the bundle folder and is sealed with the manifest's sha256, the files' hashes,
the ONNX framing of each graph, and the .npz headers against the model's geometry.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastsam2 import __version__
from fastsam2.runtime.bundle_files import (SEAL_KEY, check_npz, check_onnx, make_seal, npz_headers,
                                           regular_file, resolve_inside, seal_digest, sha256_file)
from fastsam2.runtime.contract import GRAPH_ORDER, HIDDEN_DIM, MEM_DIM
from fastsam2.runtime.errors import BundleError
from fastsam2.runtime.manifest_schema import (MAX_MANIFEST_BYTES, MAX_PROMPT_CHARS, MAX_RECORD_BYTES,
                                              RECORD_KEYS, check_engines, parse_json, validate_manifest)

__all__ = ["Bundle", "ENGINES_RECORD", "load_bundle", "read_manifest", "reseal", "sha256_file",
           "read_text_embeddings"]

# written on the device after build_plan.sh's trtexec builds: GPU, TensorRT version, engine hashes
ENGINES_RECORD = "engines.json"
# what the runtime reads or writes under engines/<target>/ besides the engines themselves
_ENGINE_AREA_FILES = (ENGINES_RECORD, "timing.cache")


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror or e}") from None


def _stamp(path: Path) -> tuple | None:
    """(inode, size, mtime) of a regular file, None when there is none: record_engines replaces
    engines.json atomically, so a rewrite changes the inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def read_text_embeddings(path) -> dict:
    """text_embeddings.npz (fastsam2.export.text.save_text_embeddings) -> {prompt: float32 [D]}."""
    heads = npz_headers(path)  # shapes from the headers, before np.load allocates them
    if set(heads) != {"prompts", "embeddings"}:
        raise BundleError(f"text embeddings '{path}' must hold exactly 'prompts' and 'embeddings'")
    (pshape, pdtype), (eshape, edtype) = heads["prompts"], heads["embeddings"]
    if (len(pshape) != 1 or len(eshape) != 2 or pshape[0] != eshape[0] or pdtype.kind != "U"
            or edtype.kind != "f" or pdtype.itemsize > 4 * MAX_PROMPT_CHARS):
        raise BundleError(f"text embeddings '{path}' are malformed: prompts {pdtype} {pshape}, "
                          f"embeddings {edtype} {eshape}")
    try:
        # allow_pickle=False: prompts are stored as a unicode array, never as objects
        with np.load(path, allow_pickle=False) as z:
            prompts, emb = z["prompts"], z["embeddings"]
    except (OSError, KeyError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"cannot read text embeddings '{path}': {first}") from None
    if not np.isfinite(emb).all():
        raise BundleError(f"text embeddings '{path}' hold non-finite numbers")
    return {str(p): emb[i].astype(np.float32) for i, p in enumerate(prompts)}


@dataclass
class Bundle:
    path: Path
    manifest: dict
    constants: dict
    text_embeddings: dict

    # (stamp of engines.json, the engines it gave): engines.json is read and checked once, again
    # only when its stamp changes (record_engines may write it while a server holds the bundle)
    _engines_seen: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def engines(self) -> dict:
        """The bundle's TensorRT engines: what export recorded (engines built at export), or,
        when the engines were built on the device from build_plan.sh, what
        `python3 -m fastsam2.runtime.record_engines` wrote beside them. engines.json lies
        outside the seal (the device writes it): it is held to the same schema, may say only
        what record_engines writes, and its engines must lie inside the bundle."""
        info = dict(self.manifest.get("engines") or {})
        if info.get("built") or not info.get("target"):
            return info
        record = self.file(f"engines/{info['target']}/{ENGINES_RECORD}")
        stamp, seen = _stamp(record), self._engines_seen
        if seen is None or seen[0] != stamp:
            seen = self._engines_seen = (stamp, self._with_record(info, record) if stamp is not None else info)
        return dict(seen[1])

    def _with_record(self, info: dict, record: Path) -> dict:
        rec = parse_json(_read_limited(record, MAX_RECORD_BYTES), str(record), MAX_RECORD_BYTES)
        if not isinstance(rec, dict):
            raise BundleError(f"{record} must hold a JSON object")
        extra = sorted(set(rec) - set(RECORD_KEYS))
        if extra:
            raise BundleError(f"{record} holds {extra[0]!r}, which record_engines never writes")
        if rec.get("target", info["target"]) != info["target"]:
            raise BundleError(f"{record} is for target {rec['target']!r}, the bundle's is {info['target']!r}")
        info.update(rec)
        check_engines(info, str(record))
        for g in info.get("graphs", {}).values():
            self.file(g["file"], "engine")
        return info

    @property
    def settings(self) -> dict:
        return self.manifest["model"]

    def file(self, rel: str, what: str = "file") -> Path:
        """A file the manifest (or engines.json) names, as a path inside the bundle folder;
        BundleError when the name, once links are followed, leaves the folder."""
        return resolve_inside(self.path, rel, what)

    def engines_dir(self, target: str | None = None) -> Path:
        """engines/<target>/ (default: the bundle's engines target), inside the bundle."""
        target = target or self.engines.get("target") or self.manifest["target"]
        return self.file(f"engines/{target}", "engines folder")

    def engine_file(self, graph: str) -> Path:
        return self.file(self.engines["graphs"][graph]["file"], "engine")

    def calibration_cache(self, graph: str, target: str | None = None) -> Path:
        """engines/<target>/calibration_<graph>.cache (fastsam2-calibrate int8 / TensorRT)."""
        d = self.engines_dir(target)
        return self.file(f"{d.relative_to(self.path).as_posix()}/calibration_{graph}.cache", "calibration cache")

    def graph_path(self, name: str, ort_variant: bool = False) -> Path:
        """The graph's file; with ort_variant, its ONNX Runtime-only variant when it has one."""
        g = self.manifest["graphs"][name]
        if ort_variant and g.get("ort_variant"):
            return self.file(g["ort_variant"]["file"], "graph")
        return self.file(g["file"], "graph")

    def summary(self) -> dict:
        m = self.manifest
        return {k: m.get(k) for k in ("fastsam2_version", "sam2_version", "config", "image_size", "keep",
                                      "target", "opset", "prompts", "router_trained", "weights_random")} | {
            "checkpoint_sha256": m["checkpoint"]["sha256"], "text_model": m["text"].get("model"),
            "text_random": m["text"].get("random")}


def _short(v) -> str:
    text = v if isinstance(v, str) and v.isprintable() else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def read_manifest(path) -> dict:
    """The manifest of the bundle at `path`, checked without reading any other file: its size,
    strict JSON, the fastsam2 version, the schema with its bounds, and the seal's digest over
    its content (an edited manifest is refused here)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle folder not found: {path}")
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise BundleError(f"{path} is not a fastsam2 bundle (no manifest.json)")
    regular_file(path, "manifest.json", "manifest")
    manifest = parse_json(_read_limited(mpath, MAX_MANIFEST_BYTES), str(mpath), MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} must hold a JSON object")
    version = manifest.get("fastsam2_version")
    if version != __version__:
        raise BundleError(f"bundle {path} was exported by fastsam2 {_short(version)}; this is fastsam2 "
                          f"{__version__}: export it again")
    validate_manifest(manifest, str(mpath))
    seal = manifest.get(SEAL_KEY)
    if seal is None:
        raise BundleError(f"{mpath} has no seal: it was not written by fastsam2-export; export the bundle again")
    if seal_digest(manifest, seal["files"]) != seal["sha256"]:
        raise BundleError(f"{mpath} was changed since export (its seal does not match): export the bundle again")
    return manifest


def _named_files(m: dict) -> list:
    """(what, entry) for every sealed file the manifest names with a sha256."""
    out = []
    for g, entry in m["graphs"].items():
        out.append((f"graph {g}", entry))
        if entry.get("ort_variant"):
            out.append((f"graph {g} (ONNX Runtime variant)", entry["ort_variant"]))
        for p, v in (entry.get("variants") or {}).items():
            out.append((f"graph {g} ({p} variant)", v))
    return out + [("constants", m["constants"]), ("text embeddings", m["text"])]


def _check_engine_area(root: Path, engines: dict) -> None:
    """engines/ is written on the device after export: whatever of it the runtime reads or
    writes must still resolve inside the bundle (no link to elsewhere)."""
    for rel in ("engines", "engines/ort-trt"):
        resolve_inside(root, rel, "engines folder")
    target = engines.get("target")
    if target:
        names = list(_ENGINE_AREA_FILES) + [f"{g}.engine" for g in GRAPH_ORDER] + \
            [f"calibration_{g}.cache" for g in GRAPH_ORDER]
        for name in [""] + names:
            resolve_inside(root, f"engines/{target}/{name}".rstrip("/"), "engines file")
    for g in (engines.get("graphs") or {}).values():
        resolve_inside(root, g["file"], "engine")
    if engines.get("build_plan"):
        resolve_inside(root, engines["build_plan"], "build plan")


def _expected_constants(m: dict) -> tuple:
    s, G = m["model"], m["token_grid"][0]
    T, f32 = G * G, np.float32
    expected = {
        "vision_pos": ((T, HIDDEN_DIM), f32), "no_mem_embed": ((HIDDEN_DIM,), f32),
        "maskmem_pos": ((T, MEM_DIM), f32), "maskmem_tpos_enc": ((s["num_maskmem"], MEM_DIM), f32),
        "no_obj_ptr": ((HIDDEN_DIM,), f32), "mask_downsample_w": ((4, 4), f32),
        "mask_downsample_b": ((1,), f32),
        # SAM2 has the projection only with proj_tpos_enc_in_obj_ptrs
        "obj_ptr_tpos_w": ((MEM_DIM, HIDDEN_DIM), f32), "obj_ptr_tpos_b": ((MEM_DIM,), f32),
    }
    optional = () if s["proj_tpos_enc_in_obj_ptrs"] else ("obj_ptr_tpos_w", "obj_ptr_tpos_b")
    return expected, optional


def load_bundle(path, verify: bool = True) -> Bundle:
    """The bundle at `path`, every check passed (see the module's docstring); `verify=False`
    skips hashing the files (the manifest's own seal is always checked)."""
    path = Path(path)
    m = read_manifest(path)
    mpath = path / "manifest.json"
    sealed = m[SEAL_KEY]["files"]
    for what, entry in _named_files(m):
        if sealed.get(entry["file"]) != entry["sha256"]:
            raise BundleError(f"{mpath}: {what} file {entry['file']!r} is not sealed with its sha256: "
                              "export the bundle again")
    files = {rel: regular_file(path, rel, "sealed file") for rel in sealed}
    _check_engine_area(path, m["engines"])
    if verify:
        for rel, digest in sealed.items():
            if sha256_file(files[rel]) != digest:
                raise BundleError(f"bundle file {files[rel]} changed since export (sha256 mismatch): export it again")
    for what, entry in _named_files(m):
        if entry["file"].endswith(".onnx"):
            check_onnx(files[entry["file"]])
    cfile = files[m["constants"]["file"]]
    expected, optional = _expected_constants(m)
    check_npz(cfile, expected, optional, what="constants")
    try:
        with np.load(cfile, allow_pickle=False) as z:
            constants = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise BundleError(f"cannot read constants {cfile}: {' '.join(str(e).split())[:200]}") from None
    bad = [k for k, v in constants.items() if not np.isfinite(v).all()]
    if bad:
        raise BundleError(f"constants {cfile}: {bad[0]!r} holds non-finite numbers: export the bundle again")
    tfile = files[m["text"]["file"]]
    n, dim = len(m["prompts"]), m["model"]["text_dim"]
    check_npz(tfile, {"prompts": ((n,), "U"), "embeddings": ((n, dim), np.float32)}, what="text embeddings")
    text = read_text_embeddings(tfile)
    if list(text) != m["prompts"]:
        raise BundleError(f"text embeddings {tfile} hold other prompts than the manifest lists")
    bundle = Bundle(path, m, constants, text)
    bundle.engines  # engines.json (device-written) is checked now, not when a backend reads it
    return bundle


def reseal(path) -> dict:
    """Seal the bundle at `path` as it is now, after an edit made on purpose (tests, tools that
    change a bundle): re-hashes every sealed file and writes manifest.json with the new seal.
    Returns the manifest written. What it reseals is trusted: use it on your own bundles only."""
    from fastsam2.runtime.outputs import atomic_write_bytes

    path = Path(path)
    mpath = regular_file(path, "manifest.json", "manifest")
    manifest = parse_json(_read_limited(mpath, MAX_MANIFEST_BYTES), str(mpath), MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} must hold a JSON object")
    manifest[SEAL_KEY] = make_seal(path, manifest)
    atomic_write_bytes(mpath, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return manifest
