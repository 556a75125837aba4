"""Export the five graphs and write a bundle (DESIGN.md §5).

The bundle is built in a temporary folder beside the target and renamed into place at the end,
with manifest.json written last: a failed export leaves nothing half-written (export/out_dir.py,
which also decides what --force may replace).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from fastsam2 import __version__
from fastsam2.runtime.bundle import sha256_file
from fastsam2.runtime.bundle_files import SEAL_KEY, make_seal
from fastsam2.runtime.contract import GRAPHS, memory_token_range, keep_to_k

from .out_dir import prepare_out_dir, staged_bundle

log = logging.getLogger(__name__)

# Operators the ONNX parser of TensorRT 8.6 (JetPack 6.0 on Jetson Orin) accepts, from
# onnx-tensorrt's operators.md for release 8.6. Graphs must stay inside this set.
TRT86_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample HardSigmoid HardSwish Identity If InstanceNormalization IsInf IsNaN LayerNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool
Mean Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
Relu Reshape Resize ReverseSequence RNN RoiAlign Round Scan Scatter ScatterElements ScatterND Selu
Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

ONNX_NAMES = {name: f"{name}.onnx" for name in GRAPHS}


def example_feeds(name: str, geom: dict, n: int = 96, ms: int | None = None, ptrs: int = 3,
                  points: int = 2, seed: int = 0, batch: int = 1) -> dict:
    """Random inputs of the contract's shapes; N, Ms, M, P and B set by the arguments."""
    rng = np.random.default_rng(seed)
    T = geom["T"]
    ms = 2 * T if ms is None else ms
    dims = dict(geom, N=n, Ms=ms, M=ms + 4 * ptrs, P=points, B=batch)
    feeds = {}
    for t in GRAPHS[name].inputs:
        shape = t.resolve(dims)
        if t.dtype == "int64":
            feeds[t.name] = (rng.integers(0, T, size=shape) if t.name == "memory_idx"
                             else np.sort(rng.choice(T, size=shape, replace=False))).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    if name == "mask_decoder":
        feeds["point_coords"] = (rng.random((batch, points, 2)) * geom["S"]).astype(np.float32)
        feeds["point_labels"] = np.resize(np.array([1, 0], np.float32), (batch, points))
        feeds["has_mask_input"] = np.zeros(1, np.float32)
    if name == "memory_encoder":
        feeds["binarize"] = np.zeros(1, np.float32)
    if name == "router":
        feeds["text_emb"] /= np.linalg.norm(feeds["text_emb"])
    return feeds


def export_graph(module, name: str, path: Path, geom: dict, opset: int = 17) -> None:
    import torch

    spec = GRAPHS[name]
    # traced with two objects: a batch axis the tracer took for a constant 1 would not fit
    feeds = example_feeds(name, geom, batch=2)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: it writes opset 17 directly (TensorRT 8.6 on JetPack 6.0
        # wants <= 17), where the dynamo exporter targets 18+ and converts down.
        torch.onnx.export(module, args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes() or None,
                          opset_version=opset, dynamo=False, do_constant_folding=True)


def check_graph(path: Path, tensorrt: bool = True) -> dict:
    """onnx.checker + the op set; returns {"ops": [...], "opset": n, "bytes": size}."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = sorted({n.op_type for n in model.graph.node})
    bad = [o for o in ops if o not in TRT86_OPS]
    if bad and tensorrt:
        raise RuntimeError(f"{path.name} uses ops TensorRT 8.6 cannot parse: {bad}")
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"ops": ops, "opset": opset, "bytes": path.stat().st_size}


def _io(specs, dims) -> list:
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.resolve(dims))} for t in specs]


def write_bundle(pruned, out: Path, *, keep, target: str, opset: int,
                 text_embeddings: dict, text_info: dict, force: bool = False,
                 profile=None, engines_hook=None, precision_plan=None, calibration_frames=None) -> dict:
    """Export every graph of `pruned` and write the bundle at `out`. Returns the manifest.

    engines_hook(tmp_bundle_dir, manifest) -> dict, when given, builds engines or writes the
    build plan inside the temporary bundle before it is moved into place. precision_plan
    (fastsam2.export.precision.precision_plan), when it names reduced precisions, adds the
    gated int8/bf16 variants of graphs (export/precision.py) before the bundle is sealed.
    """
    import onnx
    import torch

    from fastsam2.export.text import save_text_embeddings

    out = Path(out)
    prepare_out_dir(out, force)
    geom = pruned.geometry
    with staged_bundle(out, force) as tmp:
        graphs = {}
        t_all = time.perf_counter()
        for name, module in pruned.graphs.items():
            t0 = time.perf_counter()
            path = tmp / ONNX_NAMES[name]
            export_graph(module, name, path, geom, opset)
            info = check_graph(path)
            spec = GRAPHS[name]
            graphs[name] = {
                "file": path.name, "sha256": sha256_file(path), "bytes": info["bytes"],
                "opset": info["opset"], "ops": info["ops"],
                "inputs": _io(spec.inputs, geom), "outputs": _io(spec.outputs, geom),
                "dynamic": list(spec.dynamic), "export_seconds": round(time.perf_counter() - t0, 2),
            }
            log.info(f"exported {name}: {info['bytes'] / 1e6:.1f} MB, {len(info['ops'])} op types")
        for name, module in pruned.ort_variants.items():
            path = tmp / f"{name}_ort.onnx"
            export_graph(module, name, path, geom, opset)
            info = check_graph(path, tensorrt=False)
            graphs[name]["ort_variant"] = {"file": path.name, "sha256": sha256_file(path), "bytes": info["bytes"],
                                           "ops": info["ops"]}
            log.info(f"exported {name} (ONNX Runtime variant, fused attention): {info['bytes'] / 1e6:.1f} MB")
        np.savez(tmp / "constants.npz", **pruned.constants())
        save_text_embeddings(tmp / "text_embeddings.npz", text_embeddings)
        loaded = pruned.loaded
        manifest = {
            "format": 1,
            "fastsam2_version": __version__,
            "sam2_version": _version("sam2"),
            "onnx_version": onnx.__version__,
            "torch_version": torch.__version__,
            "config": loaded.config,
            "checkpoint": {"file": os.path.basename(loaded.checkpoint) if loaded.checkpoint else None,
                           "sha256": loaded.checkpoint_sha256 or "random", "seed": loaded.seed},
            "weights_random": loaded.checkpoint_sha256 is None,
            "image_size": geom["S"],
            "token_grid": [geom["G"], geom["G"]],
            **keep_fields(keep, geom["T"], pruned.settings),
            "keep_floor": 64,
            "target": target,
            "opset": opset,
            "model": pruned.settings,
            "graphs": graphs,
            "constants": {"file": "constants.npz", "sha256": sha256_file(tmp / "constants.npz")},
            "text": {"file": "text_embeddings.npz", "sha256": sha256_file(tmp / "text_embeddings.npz"),
                     **text_info},
            "prompts": list(text_embeddings),
            "router_trained": pruned.router_trained,
            "engines": {},
            "export_seconds": round(time.perf_counter() - t_all, 2),
        }
        if engines_hook is not None:
            manifest["engines"] = engines_hook(tmp, manifest) or {}
        if precision_plan is not None and precision_plan.get("graphs"):
            from fastsam2.export.precision import add_precision_variants

            add_precision_variants(tmp, manifest, precision_plan, calibration_frames)
        write_manifest(tmp, manifest)
    return manifest


def keep_fields(keep, T: int, settings: dict) -> dict:
    """The manifest's keep-dependent fields: keep, k (tokens kept; None for auto) and the memory
    token range memory attention sees (auto: from keep 0.3 to every token)."""
    k = None if keep == "auto" else keep_to_k(keep, T)
    return {"keep": keep, "k": k, "memory_tokens": {sym: list(v) for sym, v in memory_token_range(
        k or keep_to_k(0.3, T), k or T, T, settings["num_maskmem"], settings["max_obj_ptrs_in_encoder"]).items()}}


def write_manifest(bundle_dir: Path, manifest: dict) -> None:
    """Seal the bundle and write manifest.json, last: the seal is one digest over the manifest's
    content and every file written so far (fastsam2.runtime.bundle_files.sealed_names), which
    load_bundle checks. The manifest must pass the runtime's own schema, so that a field added
    here without a bound there fails at export, not on the device."""
    from fastsam2.runtime.manifest_schema import validate_manifest

    validate_manifest(manifest, "the manifest being exported")
    manifest[SEAL_KEY] = make_seal(bundle_dir, manifest)
    # strict JSON: NaN or Infinity would break other readers of the manifest
    (Path(bundle_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
