"""Read a bundle written by fastsam2-export, refusing one that changed or is from elsewhere."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastsam2 import __version__
from fastsam2.runtime.contract import GRAPH_ORDER
from fastsam2.runtime.errors import BundleError

# written on the device after build_plan.sh's trtexec builds: GPU, TensorRT version, engine hashes
ENGINES_RECORD = "engines.json"


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_text_embeddings(path) -> dict:
    """text_embeddings.npz (fastsam2.export.text.save_text_embeddings) -> {prompt: float32 [D]}."""
    try:
        # allow_pickle=False: prompts are stored as a unicode array, never as objects
        with np.load(path, allow_pickle=False) as z:
            prompts, emb = z["prompts"], z["embeddings"]
    except (OSError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"cannot read text embeddings '{path}': {first}") from None
    if prompts.ndim != 1 or emb.ndim != 2 or len(prompts) != len(emb):
        raise BundleError(f"text embeddings '{path}' are malformed: prompts {prompts.shape}, "
                          f"embeddings {emb.shape}")
    return {str(p): emb[i].astype(np.float32) for i, p in enumerate(prompts)}


@dataclass
class Bundle:
    path: Path
    manifest: dict
    constants: dict
    text_embeddings: dict

    @property
    def engines(self) -> dict:
        """The bundle's TensorRT engines: what export recorded (engines built at export), or,
        when the engines were built on the device from build_plan.sh, what
        `python3 -m fastsam2.runtime.record_engines` wrote beside them."""
        info = dict(self.manifest.get("engines") or {})
        if info.get("built") or not info.get("target"):
            return info
        record = self.path / "engines" / info["target"] / ENGINES_RECORD
        if record.is_file():
            try:
                info.update(json.loads(record.read_text()))
            except (OSError, ValueError) as e:
                raise BundleError(f"cannot read {record}: {e}") from None
        return info

    @property
    def settings(self) -> dict:
        return self.manifest["model"]

    def file(self, rel: str) -> Path:
        """A file the manifest names, as a path inside the bundle folder."""
        return self.path / rel

    def graph_path(self, name: str, ort_variant: bool = False) -> Path:
        """The graph's file; with ort_variant, its ONNX Runtime-only variant when it has one."""
        g = self.manifest["graphs"][name]
        if ort_variant and g.get("ort_variant"):
            return self.file(g["ort_variant"]["file"])
        return self.file(g["file"])

    def summary(self) -> dict:
        m = self.manifest
        return {k: m.get(k) for k in ("fastsam2_version", "sam2_version", "config", "image_size", "keep",
                                      "target", "opset", "prompts", "router_trained", "weights_random")} | {
            "checkpoint_sha256": m["checkpoint"]["sha256"], "text_model": m["text"].get("model"),
            "text_random": m["text"].get("random")}


def load_bundle(path, verify: bool = True) -> Bundle:
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"bundle folder not found: {path}")
    if not mpath.is_file():
        raise BundleError(f"{path} is not a fastsam2 bundle (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {mpath}: {e}") from None
    version = manifest.get("fastsam2_version")
    if version != __version__:
        raise BundleError(f"bundle {path} was exported by fastsam2 {version}; this is fastsam2 "
                          f"{__version__}: export it again")
    missing = [g for g in GRAPH_ORDER if g not in manifest.get("graphs", {})]
    if missing:
        raise BundleError(f"bundle {path} lacks graphs: {', '.join(missing)}")
    files = [(manifest["graphs"][g]["file"], manifest["graphs"][g]["sha256"]) for g in GRAPH_ORDER]
    files += [(v["file"], v["sha256"]) for g in GRAPH_ORDER
              if (v := manifest["graphs"][g].get("ort_variant"))]
    files += [(manifest["constants"]["file"], manifest["constants"]["sha256"]),
              (manifest["text"]["file"], manifest["text"]["sha256"])]
    for name, digest in files:
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle file missing: {f}")
        if verify and sha256_file(f) != digest:
            raise BundleError(f"bundle file {f} changed since export (sha256 mismatch): export it again")
    with np.load(path / manifest["constants"]["file"], allow_pickle=False) as z:
        constants = {k: np.asarray(z[k]) for k in z.files}
    text = read_text_embeddings(path / manifest["text"]["file"])
    return Bundle(path, manifest, constants, text)
