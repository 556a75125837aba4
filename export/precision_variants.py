"""The measuring half of the CPU precision gate (fastsam2.export.precision): making an int8
variant of a graph (ONNX Runtime's quantiser, static QDQ or dynamic), opening a graph on ONNX
Runtime or OpenVINO in a precision (OpenVINO's compile shipped in the bundle), and how far a
variant's outputs and tracked masks are from fp32's."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fastsam2.runtime import host

INT8_OPS = ("MatMul", "Gemm", "Conv")  # Hiera's attention and MLP are MatMul/Gemm; its patch embed and the FPN Conv


# -- making variants --------------------------------------------------------------------------

class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def quantize_int8(src: Path, dst: Path, method: str, feeds: list | None = None) -> dict:
    """Write an int8 copy of the ONNX graph `src`; returns how (recorded in the manifest).

    dynamic: weights int8 offline, activations quantised per call (MatMul/Gemm with a constant
             weight only: the attention's q @ kᵀ stays fp32);
    static:  QDQ with activation ranges calibrated (MinMax) on `feeds`, per-channel weights."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         extra_options={"MatMulConstBOnly": True})
        return {"format": "dynamic", "ops": ["MatMul", "Gemm"], "weights": "int8 per tensor"}
    if method != "static":
        raise ValueError(method)
    if not feeds:
        raise ValueError("static int8 needs calibration feeds")
    reduce = not host.cpu_has_vnni()
    feeds = feeds[:len(feeds) - 1] if len(feeds) > 2 and len(feeds) % 2 == 0 else feeds  # see _calib_chunks
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        # shape inference + fusions first, so LayerNorm/GELU stay fused and unquantised
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce,
                        op_types_to_quantize=list(INT8_OPS), extra_options=_calib_chunks(len(feeds)))
    onnx.checker.check_model(str(dst))
    return {"format": "qdq", "ops": list(INT8_OPS), "weights": "int8 per channel" + (", 7-bit (no VNNI)" if reduce else ""),
            "activations": "uint8, MinMax", "calibration_batches": len(feeds)}


def _calib_chunks(n: int) -> dict:
    """Merge activation ranges every 2 batches: a 1024-px Hiera's intermediate outputs take a few
    GB per frame (peak RSS 11.8 GB when merging every 3 of 8 frames). onnxruntime 1.32 fails when
    n is a multiple of the chunk (its last chunk is empty): quantize_int8 feeds an odd count."""
    return {"CalibMaxIntermediateOutputs": 2} if n > 2 else {}


# -- measuring --------------------------------------------------------------------------------

def _ort(path: Path, threads: int | None, precision: str = "fp32"):
    from fastsam2.runtime.backends import OrtSession

    return OrtSession(path, ["CPUExecutionProvider"], threads, precision=precision)


def _ov(path: Path, threads: int | None, precision: str):
    """The graph at `path` (inside the bundle being gated) compiled on OpenVINO's CPU, the
    compiled blob written into the bundle's openvino_cache/: the bf16 encoder's compile costs
    ~100 s at 1024 px on 2 cores, and a user's first run on a CPU like this one imports it
    instead (runtime.openvino_backend.shipped_blob says where it may)."""
    from fastsam2.runtime.openvino_backend import OpenVINOSession, ship_compiled

    session = OpenVINOSession(path, "CPU", threads, precision)
    ship_compiled(session, path)
    return session


def drop_unpicked_compiles(root, picks: dict, manifest: dict) -> list:
    """Remove from the bundle folder `root` the OpenVINO compiles the gate shipped (_ov) for a
    graph whose picked precision is another: a bf16 Hiera blob is ~110 MB. Returns the names
    removed."""
    from fastsam2.runtime.openvino_backend import SHIPPED_DIR, read_shipped_index, shipped_index

    root = Path(root)
    index = shipped_index(root)
    if not index.exists():
        return []
    wanted = {(manifest["graphs"][g]["file"], p) for g, p in picks.items() if g in manifest["graphs"]}
    entries = read_shipped_index(root)
    keep = [e for e in entries if (e.get("graph_file"), e.get("precision")) in wanted]
    gone = [e["file"] for e in entries if e not in keep]
    for name in gone:
        (root / SHIPPED_DIR / name).unlink(missing_ok=True)
    if keep:
        index.write_text(json.dumps({"format": 1, "compiled": keep}, indent=2) + "\n")
    else:
        index.unlink()
        (root / SHIPPED_DIR).rmdir()
    return gone


def output_agreement(ref_session, session, feeds: list) -> dict:
    """Per output: max |variant - fp32| / max |fp32| over the feeds; median ms per call."""
    errs, times, finite = {}, [], True
    for f in feeds:
        ref = ref_session.run(f)
        t0 = time.perf_counter()
        out = session.run(f)
        times.append((time.perf_counter() - t0) * 1e3)
        for n, r in ref.items():
            finite &= bool(np.isfinite(out[n]).all())
            scale = float(np.abs(r).max()) or 1.0
            errs[n] = max(errs.get(n, 0.0), float(np.abs(out[n] - r).max()) / scale)
    return {"rel_max_abs_err": {n: round(e, 5) for n, e in errs.items()}, "finite": finite,
            "ms_per_call": round(float(np.median(times)), 2) if times else None}


def lockstep_ms(sessions: dict, feeds: list, clock=time.perf_counter) -> dict:
    """Median ms per call of each session on the same feeds, timed in lockstep: feed by feed,
    every session in an order that rotates, so load that comes and goes while the gate runs
    (another process, a CPU's boost) hits every candidate alike. Timing each candidate's pass
    on its own made a loaded export pick by the load: a bf16 encoder timed at 1557 ms beside
    479 ms on a quiet machine."""
    names = list(sessions)
    times = {n: [] for n in names}
    for i, f in enumerate(feeds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = clock()
            sessions[n].run(f)
            times[n].append((clock() - t0) * 1e3)
    return {n: round(float(np.median(t)), 2) if t else None for n, t in times.items()}


def track_masks(bundle, sessions: dict, videos: list) -> list:
    """Per video, the [frames, S/4, S/4] masks tracked at keep 1.0 from its first-frame click,
    through the streaming session on the given graph sessions."""
    from fastsam2.runtime.session import Session
    from fastsam2.runtime.video import open_frames

    out = []
    for v in videos:
        s = Session.open(bundle, keep=1.0, graphs=("gate", sessions), num_frames=v.num_frames)
        s.add_prompt(1, points=[tuple(v.first_frame_points[1])])
        with open_frames(v.frames_dir_or_file) as src:
            out.append(np.stack([s.push(rgb).objects[1].logits > 0 for _, rgb in src]))
    return out


def mask_agreement(ref: list, got: list) -> dict:
    """Mean and min IoU per frame (tracked frames, the prompted one excluded) over all videos."""
    from fastsam2.runtime.metrics import mask_iou

    ious = [float(j) for a, b in zip(ref, got) for j in np.atleast_1d(mask_iou(a[1:], b[1:]))]
    return {"mean_iou": round(float(np.mean(ious)), 4), "min_iou": round(float(np.min(ious)), 4),
            "frames": len(ious)}
