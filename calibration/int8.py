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

from collections import Counter
from pathlib import Path

import numpy as np

from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, keep_to_k
from fastsam2.runtime.errors import InputError, OutputError


class RecordingSession:
    """Wraps a session; keeps a private copy of every feed (the bank reuses its buffers)."""

    def __init__(self, session, store: list):
        self.session = session
        self.store = store
        self.input_names = list(session.input_names)
        self.output_names = list(session.output_names)

    def run(self, feeds: dict) -> dict:
        self.store.append({n: np.array(feeds[n], copy=True) for n in self.input_names})
        return self.session.run(feeds)


def record_feeds(bundle, frames, max_frames: int = 32, prompt: str | None = None,
                 point=None, keep: float | None = None, threads: int | None = None,
                 num_frames: int | None = None, log=print) -> dict:
    """{graph: [feed dict per call]} over the first `max_frames` frames, ONNX Runtime CPU: the
    streaming session's own loop on recording graph sessions."""
    from fastsam2.runtime.backends import create_sessions
    from fastsam2.runtime.session import Session

    if max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {max_frames}")
    m = bundle.manifest
    keep = float(m["keep"]) if keep is None else keep
    if not 0.0 < keep <= 1.0:
        raise InputError(f"--keep must be in (0, 1], got {keep}")
    prompts = list(bundle.text_embeddings)
    if prompt is None:
        prompt = prompts[0] if prompts else None
    elif prompt not in bundle.text_embeddings:
        raise InputError(f"prompt {prompt!r} is not in the bundle (it has {', '.join(map(repr, prompts))})")
    if prompt is None and point is None:
        raise InputError("the bundle has no text prompts: give --point x,y")
    store = {g: [] for g in GRAPH_ORDER}
    sessions = {g: RecordingSession(s, store[g]) for g, s in create_sessions(bundle, "ort-cpu", threads, precision="fp32").items()}
    session = Session.open(bundle, keep=keep, graphs=("ort-cpu", sessions),
                           num_frames=None if num_frames is None else min(num_frames, max_frames))
    # search-and-track with the text alone, as fastsam2-run does with --prompt only
    session.add_prompt(1, points=[] if point is None else [tuple(point)], text=prompt)
    text_emb = (np.asarray(bundle.text_embeddings[prompt], np.float32).reshape(1, -1) if prompt
                else np.zeros((1, int(bundle.settings.get("text_dim", 512))), np.float32))
    n, prev = 0, None
    for i, rgb in frames:
        if i >= max_frames:
            break
        if prev is None:
            G4 = session.S // 4
            prev = np.zeros((1, 1, G4, G4), np.float32)
        routed = len(store["router"])
        r = session.push(rgb)
        if len(store["router"]) == routed:
            # keep 1.0 (k = T) skips the router; an int8 router engine still needs its ranges.
            # The memory encoder's `feat` is this frame's raw image features.
            feat = store["memory_encoder"][-1]["feat"]
            sessions["router"].run({"feat": feat, "text_emb": text_emb, "prev_mask_logits": prev})
        prev = r.objects[1].logits[None, None].astype(np.float32)
        n += 1
    if n == 0:
        raise InputError("no frames to calibrate on")
    k = keep_to_k(keep, session.T, m.get("keep_floor", 64))
    log(f"recorded {n} frames at keep {keep} (k = {k} of {session.T} tokens), "
        f"prompt {prompt!r}")
    return store


# -- files -----------------------------------------------------------------------------------

def save_feeds(path: Path, graph: str, feeds: list) -> dict:
    """One graph's feeds as an npz; returns {input: shape or "dynamic"} for the summary."""
    names = GRAPHS[graph].input_names
    arrays = {"input_names": np.array(names), "num_batches": np.array(len(feeds))}
    shapes = {}
    for name in names:
        vals = [f[name] for f in feeds]
        if len({v.shape for v in vals}) == 1:
            arrays[name] = np.stack(vals)
            shapes[name] = list(vals[0].shape)
        else:  # a dynamic axis changed between calls: keep each array as it was fed
            arrays.update({f"{name}_{i}": v for i, v in enumerate(vals)})
            shapes[name] = "dynamic"
    try:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return shapes


def load_feeds(path) -> list:
    """`save_feeds` output back as a list of feed dicts (what a calibrator iterates)."""
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["input_names"]]
        count = int(z["num_batches"])
        # by contract name first: an input named high_res_0 is stacked, never `high_res` + _0
        cols = {n: (list(z[n]) if n in z.files else [z[f"{n}_{i}"] for i in range(count)]) for n in names}
    return [{n: np.ascontiguousarray(cols[n][i]) for n in names} for i in range(count)]


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
                           threads: int | None = None, log=print) -> dict:
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
                             num_frames=source.num_frames, log=log)
    if profile.precision != "int8":
        log(f"note: target {profile.name} builds in {profile.precision}; the data serves an int8 profile")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror or e}") from None
    summary = {"target": profile.name, "dir": str(out), "graphs": {}}
    for graph, feeds in store.items():
        path = out / f"calib_{graph}.npz"
        shapes = save_feeds(path, graph, feeds)
        summary["graphs"][graph] = {"file": path.name, "batches": len(feeds), "inputs": shapes}
    caches = build_calibration_caches(bundle, out, store, log)
    summary["caches"] = caches
    (out / "int8_README.txt").write_text(_readme(profile.name, profile.precision, caches))
    return summary


# -- TensorRT (guarded: needs tensorrt, polygraphy and a GPU; not exercised by the tests) ----

def _modal_batches(feeds: list) -> list:
    """The feeds of the most common shape signature: calibration runs at one fixed shape."""
    sig = [tuple((n, a.shape) for n, a in sorted(f.items())) for f in feeds]
    best = Counter(sig).most_common(1)[0][0]
    return [f for f, s in zip(feeds, sig) if s == best]


def build_calibration_caches(bundle, out: Path, store: dict, log=print) -> list:
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
            log(f"{graph}: calibrated on {len(batches)} of {len(feeds)} batches -> {cache.name}")
    return written
