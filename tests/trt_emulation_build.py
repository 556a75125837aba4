"""The build side of the emulated TensorRT (see trt_emulation.py): builder, ONNX parser, builder
config, optimisation profile, and a stand-in trtexec that drives the same builder.

The builder fails where TensorRT does, by returning no engine and logging an ERROR: a dynamic
input without a profile range, a range with min > opt or opt > max in some dim, a static dim the
profile changes, a profile for an input the network lacks; a TensorRT 8.6 network created without
explicit batch; DLA on a device without DLA cores, on a core it lacks, or without GPU fallback
(the graphs have layers DLA cannot run); int8 without a calibration cache; an optimisation level
outside 0..5. The stand-in trtexec checks every flag's value (shapes against the ONNX inputs,
precision flags, DLA core against the device, pool sizes with units) before building.
"""

from __future__ import annotations

import os
import sys
import types

from trt_emulation import engine_blob


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class _Network:
    def __init__(self, explicit_batch):
        self.inputs, self.path, self.explicit_batch = [], None, explicit_batch

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class _ParserError:
    def __init__(self, text):
        self.text = text

    def desc(self):
        return self.text

    def __str__(self):
        return self.text


class _Parser:
    def __init__(self, network, logger):
        self.network, self.logger, self.errors = network, logger, []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]

    def parse_from_file(self, path):
        import onnx

        if not self.network.explicit_batch:
            # TensorRT 8.x parses ONNX into explicit-batch networks only
            self.errors.append(_ParserError("the network was not created with the EXPLICIT_BATCH flag"))
            return False
        model = onnx.load(path, load_external_data=False)
        init = {i.name for i in model.graph.initializer}
        for inp in model.graph.input:
            if inp.name in init:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
            self.network.inputs.append(_Tensor(inp.name, dims))
        self.network.path = path
        return True


class _Profile:
    def __init__(self, error):
        self.shapes, self.error, self.valid = {}, error, True

    def set_shape(self, name, lo, opt, hi):
        lo, opt, hi = tuple(lo), tuple(opt), tuple(hi)
        if not (len(lo) == len(opt) == len(hi)) or not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
            # IOptimizationProfile::setDimensions: min <= opt <= max in every dimension
            self.error(f"optimization profile for {name}: min {lo} opt {opt} max {hi} is inconsistent")
            self.valid = False
        self.shapes[name] = [lo, opt, hi]


class _TimingCache:
    def __init__(self, blob, tag):
        self.blob = bytes(blob) or tag

    def serialize(self):
        return self.blob


class _Config:
    def __init__(self, trt):
        self.trt, self.flags, self.profiles, self.pools = trt, set(), [], {}
        self.builder_optimization_level = 3
        self.default_device_type = trt.DeviceType.GPU
        self.DLA_core = -1
        self.int8_calibrator = None
        self.timing_cache = None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = int(size)

    def set_flag(self, flag):
        self.flags.add(flag)

    def create_timing_cache(self, blob):
        return _TimingCache(blob, self.trt.timing_tag)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.blob != self.trt.timing_tag and not ignore_mismatch:
            return False  # a cache from another GPU or TensorRT
        self.timing_cache = cache
        return True

    def add_optimization_profile(self, profile):
        if not profile.valid:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1


def _build_errors(trt, network, config) -> list:
    """What TensorRT's builder would refuse in this network + config."""
    errs = []
    profile = config.profiles[0].shapes if config.profiles else {}
    names = {t.name for t in network.inputs}
    errs += [f"optimization profile names {n}, which is not a network input" for n in profile if n not in names]
    for t in network.inputs:
        if t.name not in profile:
            if -1 in t.shape:
                errs.append(f"dynamic input {t.name} {t.shape} has no optimization profile range")
            continue
        lo, opt, hi = profile[t.name]
        if len(lo) != len(t.shape):
            errs.append(f"profile for {t.name} has rank {len(lo)}, the input has rank {len(t.shape)}")
        elif any(d != -1 and not d == a == b == c for d, a, b, c in zip(t.shape, lo, opt, hi)):
            errs.append(f"profile for {t.name} {lo}..{hi} changes the input's static dims {t.shape}")
    if not 0 <= config.builder_optimization_level <= 5:
        errs.append(f"builder optimization level {config.builder_optimization_level} is not in 0..5")
    if config.default_device_type == trt.DeviceType.DLA:
        cores = trt.device.dla_cores
        if not 0 <= config.DLA_core < cores:
            errs.append(f"DLA core {config.DLA_core} requested; this device has {cores} DLA cores")
        elif trt.BuilderFlag.GPU_FALLBACK not in config.flags:
            errs.append("layers with dynamic shapes or gathers cannot run on DLA and GPU fallback is off")
    if trt.BuilderFlag.INT8 in config.flags:
        cal = config.int8_calibrator
        if cal is None or not cal.read_calibration_cache():
            errs.append("int8 without a calibration cache or dynamic ranges (calibration failure)")
    return errs


def add_builder(trt, builds: list) -> None:
    """Give the emulated `tensorrt` module its build API; `builds` collects what each build got."""
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", GPU_FALLBACK="GPU_FALLBACK")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    # 10.x keeps the flag, deprecated and ignored: every network is explicit batch there
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.OnnxParser = _Parser
    trt.timing_tag = f"EMU-TIMING {trt.__version__} sm {trt.device.gpu['compute_capability']}".encode()

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            logger.log(trt.ILogger.Severity.INFO, "emulated builder")

        def create_network(self, flags=0):
            explicit = trt.major >= 10 or bool(flags & (1 << trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
            return _Network(explicit)

        def create_builder_config(self):
            return _Config(trt)

        def create_optimization_profile(self):
            return _Profile(lambda msg: self.logger.log(trt.ILogger.Severity.ERROR, msg))

        def build_serialized_network(self, network, config):
            graph = os.path.basename(network.path)[:-len(".onnx")]
            errs = _build_errors(trt, network, config)
            for e in errs:
                self.logger.log(trt.ILogger.Severity.ERROR, f"{graph}: {e}")
            if errs:
                return None
            profile = config.profiles[0].shapes if config.profiles else {}
            dla = config.default_device_type == trt.DeviceType.DLA
            precision = ("int8" if trt.BuilderFlag.INT8 in config.flags else
                         "fp16" if trt.BuilderFlag.FP16 in config.flags else "fp32")
            builds.append({"graph": graph, "flags": set(config.flags), "profile": dict(profile),
                           "device": config.default_device_type, "dla_core": config.DLA_core,
                           "workspace": config.pools.get("WORKSPACE"), "int8_calibrator": config.int8_calibrator,
                           "level": config.builder_optimization_level, "precision": precision})
            return engine_blob(network.path, graph, profile, trt=trt.__version__, gpu=trt.device.gpu,
                               precision=precision, dla_core=config.DLA_core if dla else -1,
                               workspace=config.pools.get("WORKSPACE"), level=config.builder_optimization_level)

    trt.Builder, trt.IInt8EntropyCalibrator2 = Builder, IInt8EntropyCalibrator2


# -- trtexec -----------------------------------------------------------------------------------
# the flags build_plan.sh may use (TensorRT 8.6/10 spellings); anything else is an error here
SWITCHES = {"--fp16", "--int8", "--allowGPUFallback"}
VALUED = {"--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--calib", "--memPoolSize",
          "--builderOptimizationLevel", "--useDLACore", "--timingCacheFile"}
POOLS = {"workspace", "dlaSRAM", "dlaLocalDRAM", "dlaGlobalDRAM", "tacticSharedMem"}
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class TrtexecError(Exception):
    pass


def _flags(argv) -> dict:
    opts = {}
    for a in argv:
        name, eq, value = a.partition("=")
        if name not in SWITCHES | VALUED:
            raise TrtexecError(f"unknown flag {a}")
        if name in opts:
            raise TrtexecError(f"{name} given twice")
        if (name in SWITCHES and eq) or (name in VALUED and not value):
            raise TrtexecError(f"{a}: {'takes no value' if name in SWITCHES else 'needs a value'}")
        opts[name] = value
    return opts


def _shapes(opts, network) -> dict:
    """{input: [min, opt, max]} from the shape flags, checked against the ONNX inputs."""
    inputs = {t.name: t.shape for t in network.inputs}
    out = {}
    for i, which in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
        for item in filter(None, opts.get(which, "").split(",")):
            name, _, dims = item.rpartition(":")
            if name not in inputs:
                raise TrtexecError(f"{which} names {name!r}, which is not an input of the ONNX model")
            try:
                shape = tuple(int(d) for d in dims.split("x"))
            except ValueError:
                raise TrtexecError(f"{which} {item}: dims must be integers joined by x") from None
            out.setdefault(name, [None] * 3)[i] = shape
    dynamic = {n for n, s in inputs.items() if -1 in s}
    if out and not dynamic:
        raise TrtexecError("static model does not take explicit shapes")
    for n in sorted(dynamic):
        if n not in out or None in out[n]:
            raise TrtexecError(f"dynamic input {n} needs --minShapes, --optShapes and --maxShapes")
    for n in out:
        if n not in dynamic:
            raise TrtexecError(f"input {n} is static {inputs[n]}: no shapes for it")
        if None in out[n]:
            raise TrtexecError(f"input {n} lacks one of --minShapes/--optShapes/--maxShapes")
    return out


def _config(trt, opts, builder, here):
    config = builder.create_builder_config()
    for item in opts.get("--memPoolSize", "").split(",") if "--memPoolSize" in opts else []:
        pool, _, size = item.partition(":")
        if pool not in POOLS or not size:
            raise TrtexecError(f"--memPoolSize {item}: pool must be one of {sorted(POOLS)} with a size")
        unit = size[-1] if size[-1] in UNITS else None
        if unit is None and trt.major >= 10:
            raise TrtexecError(f"--memPoolSize {item}: TensorRT 10 wants a unit (K, M or G)")
        try:
            config.set_memory_pool_limit(pool.upper() if pool == "workspace" else pool,
                                         int(float(size.rstrip("KMG")) * UNITS[unit or "M"]))
        except ValueError:
            raise TrtexecError(f"--memPoolSize {item}: size is not a number") from None
    if "--builderOptimizationLevel" in opts:
        try:
            config.builder_optimization_level = int(opts["--builderOptimizationLevel"])
        except ValueError:
            raise TrtexecError("--builderOptimizationLevel needs an integer") from None
    if "--fp16" in opts:
        config.set_flag(trt.BuilderFlag.FP16)
    if ("--int8" in opts) != ("--calib" in opts):
        raise TrtexecError("--int8 needs --calib=<cache> (without it trtexec uses dummy scales), "
                           "and --calib needs --int8")
    if "--int8" in opts:
        cache = os.path.join(here, opts["--calib"])
        if not os.path.isfile(cache):
            raise TrtexecError(f"--calib={opts['--calib']}: no calibration cache there")
        cal = trt.IInt8EntropyCalibrator2()
        cal.read_calibration_cache = lambda: open(cache, "rb").read()
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = cal
    if "--allowGPUFallback" in opts and "--useDLACore" not in opts:
        raise TrtexecError("--allowGPUFallback without --useDLACore")
    if "--useDLACore" in opts:
        try:
            config.DLA_core = int(opts["--useDLACore"])
        except ValueError:
            raise TrtexecError("--useDLACore needs an integer") from None
        config.default_device_type = trt.DeviceType.DLA
        if "--allowGPUFallback" in opts:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    return config


def trtexec_main(argv) -> int:
    """A stand-in for trtexec on the emulated device (installed by sitecustomize): checks the
    flags' values, builds with the profile the plan gives and saves the engine."""
    trt = sys.modules["tensorrt"]

    class _Log(trt.ILogger):
        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[{severity.name}] {msg}", file=sys.stderr)

    try:
        opts = _flags(argv)
        for need in ("--onnx", "--saveEngine"):
            if need not in opts:
                raise TrtexecError(f"{need} is required")
        if not os.path.isfile(opts["--onnx"]):
            raise TrtexecError(f"--onnx={opts['--onnx']}: no such file")
        builder = trt.Builder(_Log())
        network = builder.create_network(1 << trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        parser = trt.OnnxParser(network, builder.logger)
        if not parser.parse_from_file(opts["--onnx"]):
            raise TrtexecError(f"failed to parse {opts['--onnx']}")
        config = _config(trt, opts, builder, os.getcwd())
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in _shapes(opts, network).items():
            profile.set_shape(name, lo, mid, hi)
        if config.add_optimization_profile(profile) < 0:
            raise TrtexecError("invalid optimization profile")
        if "--timingCacheFile" in opts:
            path = opts["--timingCacheFile"]
            blob = open(path, "rb").read() if os.path.isfile(path) else b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=True)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise TrtexecError("engine could not be built")
        with open(opts["--saveEngine"], "wb") as f:
            f.write(engine)
        if "--timingCacheFile" in opts:
            with open(opts["--timingCacheFile"], "wb") as f:
                f.write(trt.timing_tag)
    except TrtexecError as e:
        print(f"&&&& FAILED TensorRT.trtexec (emulated) {' '.join(argv)}: {e}", file=sys.stderr)
        return 1
    return 0
