"""A bundle is a sealed unit: the seal export writes, a deliberate edit resealed, the device's
engines outside the seal, and ONNX Runtime's refusal of a damaged graph as one line. Hostile
manifests: test_bundle_hardening.py.
"""

from __future__ import annotations

import json

import pytest

from hostile_bundles import SHA, clone, manifest_of, write_manifest

from fastsam2.runtime.bundle import load_bundle, read_manifest, reseal
from fastsam2.runtime.bundle_files import describe_graph_error, seal_digest, sealed_names
from fastsam2.runtime.contract import GRAPH_ORDER
from fastsam2.runtime.errors import BundleError
from fastsam2.runtime.manifest_schema import validate_manifest


def test_export_seals_the_bundle(bundle_dir):
    m = manifest_of(bundle_dir)
    seal = m["seal"]
    assert sorted(seal["files"]) == sealed_names(bundle_dir)
    assert {"router.onnx", "constants.npz", "text_embeddings.npz"} <= set(seal["files"])
    assert "manifest.json" not in seal["files"]
    assert seal["sha256"] == seal_digest(m, seal["files"])
    validate_manifest(m)
    assert load_bundle(bundle_dir).manifest == m


def test_reseal_after_a_deliberate_edit(bundle_dir, tmp_path):
    b = clone(bundle_dir, tmp_path / "b")
    m = manifest_of(b)
    m["model"]["image_std"] = [0.25, 0.25, 0.25]
    write_manifest(b, m, seal=False)
    with pytest.raises(BundleError, match="changed since export"):
        read_manifest(b)
    reseal(b)
    assert load_bundle(b).settings["image_std"] == [0.25, 0.25, 0.25]
    # re-indenting is not an edit: the seal is over the manifest's content
    (b / "manifest.json").write_text(json.dumps(manifest_of(b), indent=7))
    load_bundle(b)


def jetson_bundle(bundle_dir, tmp_path):
    """A copy of the bundle exported for jetson-orin, engines not built: (bundle, engines dir)."""
    b = clone(bundle_dir, tmp_path / "b")
    m = manifest_of(b)
    m["engines"] = {"target": "jetson-orin", "keep_range": [0.3, 1.0], "built": False}
    write_manifest(b, m)
    d = b / "engines" / "jetson-orin"
    d.mkdir(parents=True)
    return b, d


def test_device_files_stay_outside_the_seal(bundle_dir, tmp_path):
    """engines/<target>/ is written on the device after export; the seal does not cover it."""
    b, d = jetson_bundle(bundle_dir, tmp_path)
    for f in ("router.engine", "timing.cache", "calibration_router.cache"):
        (d / f).write_bytes(b"built on the device")
    (d / "engines.json").write_text(json.dumps({"target": "jetson-orin", "built": True, "gpu_name": "Orin",
                                                "graphs": {g: {"file": f"engines/jetson-orin/{g}.engine",
                                                               "sha256": SHA} for g in GRAPH_ORDER}}))
    bundle = load_bundle(b)
    assert bundle.engines["built"] is True and bundle.engines["gpu_name"] == "Orin"
    assert bundle.engine_file("router") == b / "engines" / "jetson-orin" / "router.engine"
    assert bundle.calibration_cache("router") == d / "calibration_router.cache"


def test_engines_json_is_read_once_and_again_when_rewritten(bundle_dir, tmp_path, monkeypatch):
    """Bundle.engines reads and checks engines.json once, not on every access (each backend,
    keep check and engine lookup asks); record_engines rewriting it (atomically, as it does
    while a server holds the bundle) or removing it is seen on the next access."""
    import fastsam2.runtime.bundle as bundle_module
    from fastsam2.runtime.outputs import atomic_write_json
    from fastsam2.runtime.prompts import keep_range

    b, d = jetson_bundle(bundle_dir, tmp_path)
    record = {"target": "jetson-orin", "built": True, "gpu_name": "Orin",
              "graphs": {g: {"file": f"engines/jetson-orin/{g}.engine", "sha256": SHA} for g in GRAPH_ORDER}}
    atomic_write_json(d / "engines.json", record)
    reads = []
    real_read = bundle_module._read_limited
    monkeypatch.setattr(bundle_module, "_read_limited",
                        lambda path, limit: reads.append(path.name) or real_read(path, limit))
    bundle = load_bundle(b)
    for _ in range(4):
        assert bundle.engines["gpu_name"] == "Orin"
    bundle.engines["gpu_name"] = "changed by a caller"  # a copy: the next access is unchanged
    assert bundle.engine_file("router") == d / "router.engine" and keep_range(bundle) == (0.3, 1.0)
    assert bundle.engines["gpu_name"] == "Orin"
    assert reads.count("engines.json") == 1
    atomic_write_json(d / "engines.json", {**record, "gpu_name": "Jetson AGX Orin 64GB"})
    assert bundle.engines["gpu_name"] == "Jetson AGX Orin 64GB" and bundle.engines["built"] is True
    assert reads.count("engines.json") == 2
    (d / "engines.json").write_text(json.dumps({**record, "tensorrt_version": 5}))
    with pytest.raises(BundleError, match="tensorrt_version"):
        bundle.engines  # a bad rewrite is refused, on every access, not served from before
    with pytest.raises(BundleError, match="tensorrt_version"):
        bundle.engines
    (d / "engines.json").unlink()
    assert bundle.engines == manifest_of(b)["engines"]


def test_onnxruntime_refusal_becomes_one_bundle_line(tmp_path):
    import onnxruntime as ort

    bad = tmp_path / "router.onnx"
    bad.write_bytes(b"\x08\x07" + b"\xff" * 64)
    with pytest.raises(Exception) as e:
        ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])
    err = describe_graph_error(bad, e.value)
    assert isinstance(err, BundleError) and "\n" not in str(err)
    assert str(err).startswith(f"ONNX Runtime cannot load graph {bad}") and "/onnxruntime_src" not in str(err)
