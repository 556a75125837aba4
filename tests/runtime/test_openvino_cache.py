"""OpenVINO's compiled blobs shipped in the bundle (issue 23: the first run must not pay a compile
the export already did): the precision gate's compile lands in the bundle's openvino_cache/,
sealed; a first run imports it instead of compiling; a blob made with another OpenVINO, on
another CPU, from another graph, or corrupt, is never used and costs one line and a compile."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import THREADS, own_bundle
from fastsam2.export import precision_variants
from fastsam2.export.out_dir import what_is_there
from fastsam2.runtime import backends, host, openvino_backend
from fastsam2.runtime.bundle import load_bundle, reseal
from fastsam2.runtime.bundle_files import sha256_file

pytest.importorskip("openvino")


class CountingCore:
    """OpenVINO's Core with its compile calls counted (imports pass through)."""

    def __init__(self, real):
        self.real, self.compiled = real, []

    def compile_model(self, model, *args, **kwargs):
        self.compiled.append(os.path.basename(str(model)))
        return self.real.compile_model(model, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def counting(monkeypatch):
    c = CountingCore(openvino_backend.core())
    monkeypatch.setattr(openvino_backend, "core", lambda: c)
    return c


@pytest.fixture
def user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # an empty user cache: a first run
    return tmp_path / "xdg"


def cache_files(root) -> list:
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def outputs(session, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for port, name in zip(session.compiled.inputs, session.input_names):
        shape = [d if d > 0 else 2 for d in port.get_partial_shape().get_min_shape()]
        feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return session.run(feeds)


def test_the_gate_ships_its_compile_and_a_first_run_imports_it(monkeypatch, bundle_dir, tmp_path, counting, user_cache):
    """The bf16 encoder the gate compiled (precision_variants._ov, what export and
    `python -m fastsam2.export.precision` call) is in the sealed bundle; `auto` on an empty user
    cache imports it: one line saying so, no compile of it, nothing written to the user cache."""
    monkeypatch.setattr(openvino_backend, "device_has_bf16", lambda device="CPU": True)
    monkeypatch.setattr(backends, "available_backends", lambda: ["ort-cpu", "openvino"])
    root = own_bundle(bundle_dir, tmp_path / "b")
    gated = precision_variants._ov(root / "image_encoder.onnx", THREADS, "bf16")
    assert counting.compiled == ["image_encoder.onnx"]
    m = json.loads((root / "manifest.json").read_text())
    g = m["graphs"]["image_encoder"]
    g["variants"] = {"bf16": {"file": g["file"], "sha256": g["sha256"], "format": "hint", "backends": ["openvino"]}}
    m["precision"] = {**m.get("precision", {}), "image_encoder": "bf16"}
    (root / "manifest.json").unlink()  # a hard link into the session's bundle: replace, never write through
    (root / "manifest.json").write_text(json.dumps(m))
    sealed = reseal(root)["seal"]["files"]
    assert {"openvino_cache/index.json", "openvino_cache/image_encoder.CPU.bf16.blob"} <= set(sealed)
    assert what_is_there(root) == "bundle"  # fastsam2-export --force still knows it for a bundle
    bundle = load_bundle(root)  # every sealed file hashed, the blob included
    counting.compiled.clear()
    said = []
    name, sessions = backends.open_backend("auto", bundle, THREADS, warn=said.append)
    assert name == "ort-cpu+openvino"
    assert said[0] == f"openvino: using the bundle's compiled image_encoder (made on {host.cpu_model()})"
    assert len(said) == 2 and said[1].startswith("backend auto: image_encoder bf16 on openvino")
    assert counting.compiled == [] and sessions["image_encoder"].source == "bundle"
    assert cache_files(user_cache) == []  # OpenVINO's compile path (CACHE_DIR) never ran
    got, ref = outputs(sessions["image_encoder"]), outputs(gated)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)


def shipped_router(bundle_dir, tmp_path, precision="fp32"):
    """A bundle folder whose router (small: compiles in ~1 s) has a shipped fp32 compile."""
    root = own_bundle(bundle_dir, tmp_path / "b")
    precision_variants._ov(root / "router.onnx", THREADS, precision)
    return root


def open_router(root, tmp_path, said):
    return openvino_backend.OpenVINOSession(root / "router.onnx", "CPU", THREADS, "fp32",
                                            cache=tmp_path / "ucache", log=said.append)


def edit_index(root, **changes):
    index = root / "openvino_cache" / "index.json"
    data = json.loads(index.read_text())
    data["compiled"][0].update(changes)
    index.write_text(json.dumps(data))


def compile_line(root, tmp_path, why):
    return (f"openvino: compiling router.onnx for CPU in f32 (once: cached in {tmp_path / 'ucache'}); "
            f"the bundle's compiled router {why}")


def test_a_shipped_router_is_imported(bundle_dir, tmp_path, counting):
    root = shipped_router(bundle_dir, tmp_path)
    counting.compiled.clear()
    said = []
    s = open_router(root, tmp_path, said)
    assert said == [f"openvino: using the bundle's compiled router (made on {host.cpu_model()})"]
    assert counting.compiled == [] and s.source == "bundle" and cache_files(tmp_path / "ucache") == []
    said.clear()  # a precision the bundle ships no compile for: compiled, no word about the bundle
    openvino_backend.OpenVINOSession(root / "router.onnx", "CPU", THREADS, "fp16", cache=tmp_path / "u2", log=said.append)
    assert said == [f"openvino: compiling router.onnx for CPU in f16 (once: cached in {tmp_path / 'u2'})"]


def _other_cpu():
    """CPU flags this machine does not have, whatever it has: amx_tile flipped."""
    return sorted(set(host.cpu_features()) ^ {"amx_tile"})


@pytest.mark.parametrize("change, why", [
    ({"openvino": "2025.0.0-17942"}, "was made with OpenVINO 2025.0.0-17942"),
    ({"cpu_features": _other_cpu(), "cpu_model": "Intel Xeon"}, f"was made on another CPU (Intel Xeon: {' '.join(_other_cpu())})"),
    ({"graph_sha256": "0" * 64}, "was made from another router.onnx"),
])
def test_a_blob_from_another_openvino_cpu_or_graph_is_compiled_over(bundle_dir, tmp_path, counting, change, why):
    root = shipped_router(bundle_dir, tmp_path)
    edit_index(root, **change)
    counting.compiled.clear()
    said = []
    s = open_router(root, tmp_path, said)
    assert said == [compile_line(root, tmp_path, why)]
    assert counting.compiled == ["router.onnx"] and s.source == "compiled"
    assert any(n.endswith(".blob") for n in cache_files(tmp_path / "ucache"))  # compiled once, cached
    blobs = cache_files(tmp_path / "ucache")
    said.clear()
    open_router(root, tmp_path, said)  # the user cache holds it now: OpenVINO loads it, no line
    assert said == [] and cache_files(tmp_path / "ucache") == blobs


def _flip(root):
    blob = next((root / "openvino_cache").glob("*.blob"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the weights: OpenVINO alone would import it and compute wrong numbers
    blob.write_bytes(bytes(data))


def _truncate(root):
    blob = next((root / "openvino_cache").glob("*.blob"))
    blob.write_bytes(blob.read_bytes()[:1000])


def _consistent_garbage(root):
    """A blob whose index agrees with it (a crafted or resealed bundle): OpenVINO's refusal."""
    blob = next((root / "openvino_cache").glob("*.blob"))
    blob.write_bytes(b"RR_UPCVO" + os.urandom(4096))
    edit_index(root, sha256=sha256_file(blob), bytes=blob.stat().st_size)


def _other_isa(root):
    """The header of a blob made for another instruction set, its index agreeing: OpenVINO's own
    check refuses it."""
    blob = next((root / "openvino_cache").glob("*.blob"))
    data = blob.read_bytes()
    i = data.index(b"isa=")
    blob.write_bytes(data[:i + 4] + bytes(c ^ 0x20 if 0x41 <= c <= 0x7A else c for c in data[i + 4:i + 12]) + data[i + 12:])
    edit_index(root, sha256=sha256_file(blob), bytes=blob.stat().st_size)


@pytest.mark.parametrize("damage, why", [
    (_flip, "router.CPU.fp32.blob is corrupt (its sha256 does not match its index)"),
    (_truncate, "router.CPU.fp32.blob is 1000 bytes, not the"),
    (_consistent_garbage, "does not load here: "),
    (_other_isa, "does not load here: [CPU] Cannot import compiled blob"),
    (lambda root: (root / "openvino_cache" / "index.json").write_text("{not json"), "cannot be read ("),
    (lambda root: edit_index(root, file="../router.onnx"), "cannot be read (bundle"),
    (lambda root: (root / "openvino_cache" / "index.json").write_text('{"format": 1, "compiled": [{"graph_file": '
                                                                     '"router.onnx", "device": "CPU", "precision": '
                                                                     '"fp32", "openvino": []}]}'), "was made with OpenVINO []"),
])
def test_a_damaged_blob_or_index_is_survived_with_one_line(bundle_dir, tmp_path, counting, damage, why):
    root = shipped_router(bundle_dir, tmp_path)
    damage(root)
    counting.compiled.clear()
    said = []
    s = open_router(root, tmp_path, said)
    assert len(said) == 1 and said[0].startswith(compile_line(root, tmp_path, why)), said
    assert "\n" not in said[0] and "Exception from" not in said[0]
    assert counting.compiled == ["router.onnx"] and s.source == "compiled"
    ref = openvino_backend.OpenVINOSession(root / "router.onnx", "CPU", THREADS, "fp32")
    got, want = outputs(s), outputs(ref)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_compiles_of_precisions_the_gate_did_not_pick_leave_the_bundle(bundle_dir, tmp_path):
    """A bf16 Hiera blob is ~110 MB: a compile the gate made for a candidate it then dropped
    (precision_variants.drop_unpicked_compiles) is removed with its index entry."""
    root = shipped_router(bundle_dir, tmp_path)
    precision_variants._ov(root / "memory_encoder.onnx", THREADS, "fp32")
    manifest = json.loads((root / "manifest.json").read_text())
    picks = {"router": "fp32", "memory_encoder": "int8", "image_encoder": "bf16"}
    assert precision_variants.drop_unpicked_compiles(root, picks, manifest) == ["memory_encoder.CPU.fp32.blob"]
    assert sorted(p.name for p in (root / "openvino_cache").iterdir()) == ["index.json", "router.CPU.fp32.blob"]
    assert [e["graph_file"] for e in openvino_backend.read_shipped_index(root)] == ["router.onnx"]
    assert precision_variants.drop_unpicked_compiles(root, {"router": "int8"}, manifest) == ["router.CPU.fp32.blob"]
    assert not (root / "openvino_cache").exists()
    assert precision_variants.drop_unpicked_compiles(root, {"router": "int8"}, manifest) == []


def test_another_thread_count_loads_the_user_cache_without_a_compile_line(bundle_dir, tmp_path, counting):
    """OpenVINO's cache key leaves INFERENCE_NUM_THREADS out: `--threads 1` after a default run
    loads the same blob, so it must not say "compiling" (it did: the marker was per thread count)."""
    said = []
    path = bundle_dir / "router.onnx"
    openvino_backend.OpenVINOSession(path, "CPU", None, "fp32", cache=tmp_path / "u", log=said.append)
    assert len(said) == 1 and said[0].startswith("openvino: compiling router.onnx")
    blobs = cache_files(tmp_path / "u")
    said.clear()
    openvino_backend.OpenVINOSession(path, "CPU", 1, "fp32", cache=tmp_path / "u", log=said.append)
    assert said == [] and cache_files(tmp_path / "u") == blobs  # no second blob: OpenVINO loaded the first
