"""TensorRT side of export: optimisation-profile shapes, a trtexec build plan, and engine builds.

Engines are tied to one GPU and one TensorRT version, and the export machine is usually not the
device. So export always writes `engines/<target>/build_plan.sh` (trtexec + Polygraphy lines to
run on the device) and builds engines in-process only where TensorRT and a GPU are present.

Written for TensorRT 8.6 (JetPack 6.0) and 10.x. TensorRT 11 drops weakly typed precision
(`--fp16`, `BuilderFlag.FP16`, int8 calibrators): there an fp16 profile needs an fp16 ONNX and
`--stronglyTyped`, which this module does not produce; `build_engines` says so.

The router's top-k runs in numpy, not in the graph: TensorRT's TopK caps K at 3840, below
T = 4096 at 1024² input, so nothing here has to respect that limit.
"""

from __future__ import annotations

import functools
import logging
import math
import stat
import time
from pathlib import Path

from fastsam2.runtime.contract import ENGINE_RTOL, GRAPHS, dynamic_inputs, geometry, profile_shapes
from fastsam2.runtime.errors import BackendError, BundleError, InputError
from fastsam2.runtime import trt_backend
from fastsam2.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
# one int8 cache per graph (fastsam2-calibrate int8): a cache maps tensor names to scales and the
# graphs reuse names (`feat` is raw in the router, conditioned in the decoder)
CALIBRATION_CACHE = "calibration_{graph}.cache"
# parity tolerances of the contract are for fp32; reduced precision gets looser ones
_TOL_SCALE = {"fp32": 1.0, "fp16": 10.0, "int8": 100.0}


def engines_dir(bundle_dir, profile) -> Path:
    return Path(bundle_dir) / "engines" / profile.name


def shape_profiles(profile, image_size: int, keep: float, num_maskmem: int = 7,
                   max_obj_ptrs: int = 16, text_dim: int = 512) -> dict:
    """`profile_shapes` for a target: its keep range, `keep` as the optimum, its point count."""
    if not profile.keep_min <= keep <= profile.keep_max:
        raise InputError(
            f"keep {keep} is outside target {profile.name}'s range "
            f"[{profile.keep_min}, {profile.keep_max}]"
        )
    return profile_shapes(image_size, profile.keep_min, keep, profile.keep_max, num_maskmem,
                          max_obj_ptrs, text_dim, profile.max_points)


def _trtexec_shapes(shapes: dict, names: list, which: int) -> str:
    return ",".join(f"{n}:{'x'.join(str(d) for d in shapes[n][which])}" for n in names)


def _polygraphy_shapes(shapes: dict, names: list, which: int) -> str:
    # quoted: an unquoted `[..]` is a bash glob
    return " ".join(f"'{n}:[{','.join(str(d) for d in shapes[n][which])}]'" for n in names)


def _trtexec_line(graph: str, profile, shapes: dict) -> str:
    dyn = dynamic_inputs(graph)
    args = [f'"$TRTEXEC" --onnx=../../{graph}.onnx --saveEngine={graph}.engine']
    if dyn:
        args += [f"--{w}Shapes={_trtexec_shapes(shapes[graph], dyn, i)}"
                 for i, w in enumerate(("min", "opt", "max"))]
    if profile.precision == "fp16":
        args.append("--fp16")
    elif profile.precision == "int8":
        # fp16 too, so layers int8 cannot take do not drop to fp32
        args.append(f"--int8 --fp16 --calib={CALIBRATION_CACHE.format(graph=graph)}")
    # `workspace:<N>M`: TensorRT 8.6 reads MiB by default, 10.x wants the unit; both accept this
    args.append(f"--memPoolSize=workspace:{profile.workspace_mib}M")
    args.append(f"--builderOptimizationLevel={profile.builder_optimization_level}")
    if profile.dla_core >= 0:
        args.append(f"--useDLACore={profile.dla_core} --allowGPUFallback")
    args.append(f"--timingCacheFile={TIMING_CACHE}")
    return " ".join(args)


def _polygraphy_lines(graph: str, profile, shapes: dict, image_size: int) -> list:
    """Check the engine the plan saved (not a second build) against ONNX Runtime, in two steps:
    ONNX Runtime on random inputs, saving inputs and outputs; then the engine on the same inputs,
    compared with the contract's tolerances (x10 fp16, x100 int8). At the opt shapes, and for
    graphs with dynamic inputs at the profile's maxima too (full memory bank, most points)."""
    spec = GRAPHS[graph]
    dyn = dynamic_inputs(graph)
    scale = _TOL_SCALE[profile.precision]
    # random int64 inputs are gather indices into the token grid: keep them inside it
    t = geometry(image_size)["T"]
    idx = [x.name for x in spec.inputs if x.dtype == "int64"]
    lines = []
    for which, tag in ((1, ""), (2, ".max")) if dyn else ((1, ""),):
        saved = f"checks/{graph}{tag}"
        ref = [f"polygraphy run ../../{graph}.onnx --onnxrt"]
        if dyn:
            ref.append(f"--input-shapes {_polygraphy_shapes(shapes[graph], dyn, which)}")
        if idx:
            ref.append("--val-range " + " ".join(f"'{n}:[0,{t - 1}]'" for n in idx))
        ref.append(f"--save-inputs {saved}.inputs.json --save-outputs {saved}.onnxrt.json")
        check = [f"polygraphy run {graph}.engine --model-type engine --trt",
                 f"--load-inputs {saved}.inputs.json --load-outputs {saved}.onnxrt.json",
                 "--atol " + " ".join(f"{o}:{a * scale:g}" for o, a in spec.engine_atol.items()),
                 f"--rtol {ENGINE_RTOL * scale:g}"]
        lines += [" ".join(ref), " ".join(check)]
    return lines


def write_build_plan(bundle_dir, profile, shapes: dict) -> Path:
    """Write `engines/<target>/build_plan.sh`: one trtexec build and one Polygraphy check per graph."""
    if not profile.tensorrt:
        raise InputError(f"target {profile.name} runs on ONNX Runtime only; it has no TensorRT build plan")
    missing = [g for g in GRAPHS if g not in shapes]
    if missing:
        raise ValueError(f"shapes lack graphs: {missing}")
    image_size = shapes["image_encoder"]["image"][1][-1]
    n_lo, n_opt, n_hi = (shapes["memory_attention"]["curr"][i][0] for i in range(3))
    out = engines_dir(bundle_dir, profile)
    out.mkdir(parents=True, exist_ok=True)
    dla = (f"DLA core {profile.dla_core} with GPU fallback" if profile.dla_core >= 0 else "no DLA")
    lines = [
        "#!/usr/bin/env bash",
        f"# fastsam2 TensorRT build plan for target {profile.name}: {profile.description}",
        f"# device: {profile.device} (compute capability {profile.compute_capability}); "
        f"precision {profile.precision}; {dla}",
        f"# keep range {profile.keep_min}..{profile.keep_max} -> memory attention N "
        f"{n_lo}..{n_hi} (opt {n_opt}) at image size {image_size}",
        "#",
        "# Engines only load on the GPU and TensorRT version that built them: copy the whole",
        "# bundle to the device and run, there:",
        f"#     bash bundle/engines/{profile.name}/build_plan.sh",
        "# TRTEXEC overrides the trtexec binary (JetPack keeps it in /usr/src/tensorrt/bin); after",
        "# the builds, fastsam2 (pip install fastsam2[runtime,trt]) records them in engines.json",
        "# so that `fastsam2-run --backend tensorrt` (or auto) uses them; PYTHON picks its python.",
        "# SKIP_CHECKS=1 skips the Polygraphy parity checks (each saved engine vs ONNX Runtime on",
        "# the same random inputs at the opt shapes, and at the profile's maxima where shapes are",
        "# dynamic; SKIP_BUILD=1 runs only them). Tolerances are the graph contract's, x10 for",
        "# fp16 (x100 for int8): reduced precision misses fp32's.",
        "# Written for TensorRT 8.6 / 10.x (TensorRT 11 has no --fp16).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        "",
        "# build",
    ]
    lines += ['if [[ "${SKIP_BUILD:-0}" != 1 ]]; then']
    lines += ["  " + _trtexec_line(g, profile, shapes) for g in GRAPHS]
    # the runtime needs to know which GPU and TensorRT built them (and their hashes)
    lines += ['  "${PYTHON:-python3}" -m fastsam2.runtime.record_engines ../..']
    lines += ["fi"]
    lines += ["", "# check each saved engine against ONNX Runtime", 'if [[ "${SKIP_CHECKS:-0}" != 1 ]]; then',
              "  mkdir -p checks"]
    lines += ["  " + ln for g in GRAPHS for ln in _polygraphy_lines(g, profile, shapes, image_size)]
    lines += ["fi", ""]
    path = out / "build_plan.sh"
    path.write_text("\n".join(lines))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _note(log_file, msg: str) -> None:
    """A line of ours in build.log, and in the log."""
    log_file.write(msg + "\n")
    log.info(msg)


def build_engines(bundle_dir, profile, shapes: dict) -> dict:
    """Build every graph's engine here with the TensorRT Python API; return what the manifest records.

    Needs tensorrt, polygraphy (for the GPU query) and a GPU. Writes `<graph>.engine`,
    `timing.cache` and `build.log` under `engines/<target>/`; our own lines in build.log are
    logged too.
    """
    # not Polygraphy's NetworkFromOnnxPath -> CreateConfig -> EngineBytesFromNetwork: CreateConfig pins DLA_core = 0 (a profile names its core), drops a mismatched timing cache silently and logs to G_LOGGER, not build.log; and one build on tests' stand-in TensorRT needed 9 APIs more (measured: Logger severities, init_libnvinfer_plugins, ITensor.dtype/is_shape_tensor, layer iteration, enum flags, get_flag, num_optimization_profiles)
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(
            f"building engines needs `pip install fastsam2[trt]` (tensorrt; on Jetson it comes "
            f"with JetPack) and an NVIDIA GPU; here: {e}; or run engines/{profile.name}/build_plan.sh "
            "on the device"
        ) from None
    if not profile.tensorrt:
        raise InputError(f"target {profile.name} runs on ONNX Runtime only; no engines to build")
    gpu = trt_backend.current_gpu()
    if gpu is None:
        raise BackendError("building engines needs a visible NVIDIA GPU; none found")
    bundle_dir = Path(bundle_dir)
    missing = [g for g in GRAPHS if not (bundle_dir / f"{g}.onnx").is_file()]
    if missing:
        raise BundleError(f"{bundle_dir} lacks {', '.join(m + '.onnx' for m in missing)}")
    flags = trt.BuilderFlag
    if profile.precision != "fp32" and not hasattr(flags, "FP16"):
        raise BackendError(
            f"TensorRT {trt.__version__} builds strongly typed networks only; target "
            f"{profile.name} wants {profile.precision}, which needs TensorRT 8.6-10.x"
        )
    out = engines_dir(bundle_dir, profile)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "build.log", "w")

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            # TensorRT may still log while the builder is torn down, after the file is closed
            if severity != trt.ILogger.Severity.VERBOSE and not log_file.closed:
                log_file.write(f"[trt {getattr(severity, 'name', severity)}] {msg}\n")

    note = functools.partial(_note, log_file)
    logger = _Logger()
    builder = trt.Builder(logger)
    # 8.x needs explicit batch asked for; 10 made it the only mode and deprecated the flag
    major = int(trt.__version__.split(".")[0])
    net_flags = 0
    if major < 10:
        net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    cache_path = out / TIMING_CACHE
    cache = None
    result = {
        "target": profile.name, **gpu, "tensorrt_version": trt.__version__,
        "precision": profile.precision, "dla_core": profile.dla_core, "graphs": {},
    }
    note(f"TensorRT {trt.__version__} on {gpu['gpu_name']} (sm {gpu['compute_capability']}), "
         f"target {profile.name}")
    try:
        for gname in GRAPHS:
            network = builder.create_network(net_flags)
            parser = trt.OnnxParser(network, logger)
            # parse_from_file, not parse(bytes): it finds external weight files beside the .onnx
            if not parser.parse_from_file(str(bundle_dir / f"{gname}.onnx")):
                errs = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
                note(f"{gname}: ONNX parse failed: {errs}")
                raise BackendError(f"TensorRT {trt.__version__} cannot parse {gname}.onnx: {errs}")

            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
            config.builder_optimization_level = profile.builder_optimization_level
            if profile.precision in ("fp16", "int8"):
                config.set_flag(flags.FP16)
            if profile.precision == "int8":
                # held here: the config keeps only a raw pointer to the calibrator
                calibrator = _set_int8(trt, config, out / CALIBRATION_CACHE.format(graph=gname))  # noqa: F841
            if profile.dla_core >= 0:
                config.default_device_type = trt.DeviceType.DLA
                config.DLA_core = profile.dla_core
                config.set_flag(flags.GPU_FALLBACK)
            if cache is None:
                blob = cache_path.read_bytes() if cache_path.is_file() else b""
                cache = config.create_timing_cache(blob)
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                # a cache from another GPU or TensorRT: start a fresh one rather than mix timings
                note(f"{cache_path.name} does not match this GPU/TensorRT; starting a new one")
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, ignore_mismatch=False)

            opt_profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                tensor = network.get_input(i)
                if -1 in tuple(tensor.shape):
                    if tensor.name not in shapes[gname]:
                        raise BundleError(f"{gname}.onnx input {tensor.name} is dynamic but not in the contract")
                    lo, mid, hi = shapes[gname][tensor.name]
                    opt_profile.set_shape(tensor.name, lo, mid, hi)
            if config.add_optimization_profile(opt_profile) < 0:
                # TensorRT checks min <= opt <= max per dim here and answers -1 (details in the log)
                note(f"{gname}: TensorRT refused the optimisation profile {shapes[gname]}")
                raise BackendError(f"TensorRT refused {gname}'s optimisation profile (min <= opt <= max "
                                   f"must hold in every dim); see {out / 'build.log'}")

            t0 = time.perf_counter()
            serialized = builder.build_serialized_network(network, config)
            seconds = time.perf_counter() - t0
            if serialized is None:
                note(f"{gname}: build failed after {seconds:.1f} s")
                raise BackendError(f"TensorRT could not build {gname}; see {out / 'build.log'}")
            engine_path = out / f"{gname}.engine"
            with open(engine_path, "wb") as f:
                f.write(serialized)
            result["graphs"][gname] = {
                "file": str(engine_path.relative_to(bundle_dir)),
                "sha256": sha256_file(engine_path),
                "build_seconds": round(seconds, 2),
            }
            note(f"{gname}: built in {seconds:.1f} s -> {engine_path.name}")
        if cache is not None:
            cache_path.write_bytes(memoryview(cache.serialize()))
    finally:
        log_file.close()
    return result


def check_engines(bundle_dir, built: dict, shapes: dict, precision: str, seed: int = 0) -> dict:
    """Each engine `build_engines` wrote vs its ONNX graph on ONNX Runtime (CPU), on the same
    seeded random inputs (indices inside the token grid) at the opt shapes and, for graphs with
    dynamic inputs, at the profile's maxima too (full memory bank, most prompt points: the
    largest buffers and the shapes a run reaches last), with the contract's tolerance,
    max|trt - ort| <= atol + rtol * max|ort|, scaled like the build plan's Polygraphy checks (x10
    fp16, x100 int8). Returns {graph: {"outputs": {output: {max_abs_err, tol, at}}, "passed"}},
    each output's worst case over the shapes checked (`at`: "opt" or "max"); a non-finite error
    is NaN and fails."""
    # not Polygraphy's Comparator + CompareFunc.simple: it passes an element within atol OR rtol * |ref| (not the contract's max error <= atol + rtol * max|ref| recorded per output), and its TrtRunner needs trt.IOutputAllocator (the stand-in has none) instead of the runtime's own TensorRTSession, which this checks
    import numpy as np
    import onnxruntime as ort

    from fastsam2.runtime.trt_backend import TensorRTSession

    bundle_dir = Path(bundle_dir)
    t = geometry(shapes["image_encoder"]["image"][1][-1])["T"]
    scale = _TOL_SCALE[precision]
    rng = np.random.default_rng(seed)
    report = {}
    for g, spec in GRAPHS.items():
        sess = ort.InferenceSession(str(bundle_dir / f"{g}.onnx"), providers=["CPUExecutionProvider"])
        outs = {}
        # a DLA engine runs on the core the runtime names, as fastsam2-run will load it
        with TensorRTSession(bundle_dir / built["graphs"][g]["file"], dla_core=built.get("dla_core", -1)) as engine:
            for at, which in (("opt", 1), ("max", 2)) if dynamic_inputs(g) else (("opt", 1),):
                feeds = {}
                for x in spec.inputs:
                    shape = shapes[g][x.name][which]
                    feeds[x.name] = (rng.integers(0, t, shape, dtype=np.int64) if x.dtype == "int64"
                                     else rng.standard_normal(shape).astype(np.float32))
                ref = dict(zip(spec.output_names, sess.run(spec.output_names, feeds)))
                got = engine.run(feeds)
                for o in spec.output_names:
                    err = float(np.max(np.abs(got[o].astype(np.float32) - ref[o]))) if ref[o].size else 0.0
                    here = {"max_abs_err": err, "tol": spec.tolerance(o, ref[o], scale, engine=True), "at": at}
                    if o not in outs or _worse(here, outs[o]):
                        outs[o] = here
        del sess
        report[g] = {"outputs": outs, "passed": all(v["max_abs_err"] <= v["tol"] for v in outs.values())}
    return report


def _worse(a: dict, b: dict) -> bool:
    """Is check `a` further out of tolerance than `b`? NaN (a non-finite output) is worst."""
    ra, rb = a["max_abs_err"] / a["tol"], b["max_abs_err"] / b["tol"]
    return math.isnan(ra) or (not math.isnan(rb) and ra > rb)


def _set_int8(trt, config, calib_cache: Path):
    """Int8 from a calibration cache alone: the calibrator never feeds batches."""
    if not calib_cache.is_file():
        raise BundleError(f"int8 needs a calibration cache at {calib_cache} (fastsam2-calibrate)")
    if not hasattr(trt.BuilderFlag, "INT8") or not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise BackendError(f"TensorRT {trt.__version__} has no implicit int8 calibration")
    blob = calib_cache.read_bytes()

    class _CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return blob

        def write_calibration_cache(self, cache):
            return None

    calibrator = _CacheCalibrator()
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = calibrator
    return calibrator
