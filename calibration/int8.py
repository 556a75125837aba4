"""INT8 calibration data: the tensors each graph really receives while tracking the user's frames.

TensorRT's post-training int8 needs representative inputs per network. Random or single-frame
inputs are not: memory attention sees a bank that fills over num_maskmem frames, the decoder
sees conditioned features, the memory encoder sees real mask logits. So this runs the bundle's
ONNX graphs (ONNX Runtime, CPU) through the real tracking loop and records every feed:

    engines/<target>/calib_<graph>.npz   one per graph: `input_names`, `num_batches`, and per
                                         input either `<input>` [B, *shape] (shapes agree) or
                                         `<input>_<i>` (dynamic axes, e.g. memory's M grows)
    engines/<target>/int8_README.txt     how to turn it into engines
    engines/<target>/calibration_<graph>.cache
                                         only where TensorRT + polygraphy + a GPU are here

One cache per graph, not one for all: TensorRT caches map tensor names to scales, and the five
ONNX graphs reuse names (`feat` is raw features in one graph, conditioned features in another;
exporter names like `/Add_output_0` repeat), so a shared cache would mix ranges.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

# the recording and its files live in export (its precision gate calibrates from them too);
# calibration sits above export. load_feeds stays importable from here (int8_README.txt names it)
from fastsam2.export.feeds import load_feeds, record_feeds, save_feeds  # noqa: F401
from fastsam2.runtime.errors import InputError, OutputError

log = logging.getLogger(__name__)


def _readme(target: str, precision: str, caches: list) -> str:
    made = ("calibration caches were built here: " + ", ".join(caches)) if caches else (
        "no calibration cache was built here (that needs tensorrt + polygraphy and an NVIDIA GPU)")
    note = "" if precision == "int8" else (
        f"\nNote: target {target} builds in {precision}; use a profile with precision = \"int8\"\n"
        "(a copy of its TOML passed as --target path/to/profile.toml) for int8 engines.\n")
    return f"""fastsam2 INT8 calibration for target {target}

calib_<graph>.npz hold the inputs each graph received while tracking your frames (ONNX
Runtime, the real tracking loop). Load one with fastsam2.calibration.int8.load_feeds(path)
-> list of {{input name: array}}, the batches a TensorRT int8 calibrator iterates.
{note}
TensorRT needs one calibration cache per graph (tensor names repeat across the five graphs).
{made}.

On the device (TensorRT + polygraphy + GPU), build the caches from this data:
    fastsam2-calibrate int8 --bundle BUNDLE --frames FRAMES --target {target}
or with Polygraphy directly, per graph, where loader.py's load_data() returns
load_feeds("calib_<graph>.npz"):
    polygraphy convert ../../<graph>.onnx --int8 --fp16 --data-loader-script loader.py \\
        --calibration-cache calibration_<graph>.cache -o <graph>.engine
Then build each engine with its cache, as build_plan.sh does with --int8:
    trtexec --onnx=../../<graph>.onnx --saveEngine=<graph>.engine --int8 --fp16 \\
        --calib=calibration_<graph>.cache   (plus the plan's --minShapes/--optShapes/--maxShapes)
On a CPU (ONNX Runtime / OpenVINO), the same data calibrates static int8 (QDQ) variants, gated
against fp32 and recorded in the bundle:
    python -m fastsam2.export.precision BUNDLE --precision int8 --calibration engines/{target}/
Calibration runs at fixed shapes: for graphs with dynamic inputs (memory_attention's N/M/Ms,
mask_decoder's P) only the batches of the most common shape feed the calibrator. Memory
attention's M stops growing once the bank and the object pointers are full (frame
max_obj_ptrs_in_encoder = 16 for SAM2.1): record >= 24 frames (default 32) so that steady
state, which is also the build profile's opt shape, gets several batches.
"""


def write_int8_calibration(bundle_dir, frames, max_frames: int = 32, target: str | None = None,
                           prompt: str | None = None, point=None, keep: float | None = None,
                           threads: int | None = None) -> dict:
    """The library behind `fastsam2-calibrate int8`; returns a summary of what was written."""
    from fastsam2.profiles import load_profile
    from fastsam2.runtime.bundle import load_bundle
    from fastsam2.runtime.video import open_frames

    if max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {max_frames}")
    bundle = load_bundle(bundle_dir)
    target = target or bundle.manifest["target"]
    profile = load_profile(target)
    out = Path(bundle_dir) / "engines" / profile.name
    with open_frames(frames) as source:
        store = record_feeds(bundle, source, max_frames, prompt, point, keep, threads,
                             num_frames=source.num_frames)
    if profile.precision != "int8":
        log.info(f"note: target {profile.name} builds in {profile.precision}; the data serves an int8 profile")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror or e}") from None
    summary = {"target": profile.name, "dir": str(out), "graphs": {}}
    for graph, feeds in store.items():
        path = out / f"calib_{graph}.npz"
        shapes = save_feeds(path, graph, feeds)
        summary["graphs"][graph] = {"file": path.name, "batches": len(feeds), "inputs": shapes}
    caches = build_calibration_caches(bundle, out, store)
    summary["caches"] = caches
    (out / "int8_README.txt").write_text(_readme(profile.name, profile.precision, caches))
    return summary


# -- TensorRT (guarded: needs tensorrt, polygraphy and a GPU; not exercised by the tests) ----

def _modal_batches(feeds: list) -> list:
    """The feeds of the most common shape signature: calibration runs at one fixed shape."""
    sig = [tuple((n, a.shape) for n, a in sorted(f.items())) for f in feeds]
    best = Counter(sig).most_common(1)[0][0]
    return [f for f, s in zip(feeds, sig) if s == best]


def build_calibration_caches(bundle, out: Path, store: dict) -> list:
    """calibration_<graph>.cache per graph via IInt8EntropyCalibrator2; [] where TensorRT is absent."""
    try:
        import tensorrt as trt
        from polygraphy.backend.trt import (Calibrator, CreateConfig, EngineBytesFromNetwork,
                                            NetworkFromOnnxPath, Profile)
    except ImportError:
        return []
    from fastsam2.runtime.trt_backend import current_gpu

    if current_gpu() is None or not hasattr(trt, "IInt8EntropyCalibrator2"):
        return []  # no GPU, or TensorRT 11 (no implicit int8 calibration)
    written = []
    for graph, feeds in store.items():
        batches = _modal_batches(feeds)
        builder, network, parser = NetworkFromOnnxPath(str(bundle.graph_path(graph)))()
        # TensorRT 8.6 imports int64 indices as int32: feed what the network declares
        dtypes = {network.get_input(i).name: np.dtype(trt.nptype(network.get_input(i).dtype))
                  for i in range(network.num_inputs)}
        batches = [{n: a.astype(dtypes.get(n, a.dtype), copy=False) for n, a in b.items()} for b in batches]
        profile = Profile()
        for name, arr in batches[0].items():
            profile.add(name, arr.shape, arr.shape, arr.shape)
        cache = out / f"calibration_{graph}.cache"
        cache.unlink(missing_ok=True)  # a stale cache would be read back instead of calibrating
        calibrator = Calibrator(batches, cache=str(cache), BaseClass=trt.IInt8EntropyCalibrator2)
        config = CreateConfig(int8=True, fp16=True, calibrator=calibrator, profiles=[profile])
        EngineBytesFromNetwork((builder, network, parser), config=config)()
        if cache.is_file():
            written.append(cache.name)
            log.info(f"{graph}: calibrated on {len(batches)} of {len(feeds)} batches -> {cache.name}")
    return written
