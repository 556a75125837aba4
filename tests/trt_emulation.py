"""An emulated CUDA device + `tensorrt` module, for testing fastsam2's TensorRT code without a GPU.

What stays real: fastsam2's code (engine build loop, manifest, TensorRTSession, the tracking
loop) and Polygraphy's `DeviceArray`/`Stream` (with their buffer-size and dtype checks).
What is emulated:
- CUDA: Polygraphy's global wrapper is swapped for `HostCuda`, which "allocates" host memory and
  copies with memmove.
- TensorRT: the builder parses the ONNX file's inputs (-1 for dynamic axes, like TensorRT),
  records the optimisation profile and flags it is given, and serialises an "engine" that is a
  small JSON naming the ONNX graph and that profile. The runtime deserialises it into an engine
  that enforces the profile, declares int64 index inputs as int32 (TensorRT 8.6 does), reads its
  inputs from the device addresses it was given, runs onnxruntime and writes its outputs back.

This proves plumbing (names, shapes, dtypes, buffers, profiles, files, manifest), not TensorRT's
parser coverage, numerics or speed.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import sys
import types

import numpy as np

from fastsam2.runtime.contract import GRAPHS, geometry

EMU_GPU = {"gpu_name": "Emulated GPU", "compute_capability": "9.0"}
EMU_TRT = "10.0.0-emulated"
PERTURB = {}  # graph -> offset the emulated engine adds to its outputs (tests of the checks)


class HostCuda:
    """Polygraphy's CUDA wrapper, over host memory."""

    handle = None

    def __init__(self):
        self.blocks = {}

    def malloc(self, nbytes):
        buf = ctypes.create_string_buffer(int(nbytes))
        self.blocks[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def free(self, ptr):
        self.blocks.pop(int(ptr or 0), None)

    def memcpy(self, dst, src, nbytes, kind, stream_ptr=None):
        ctypes.memmove(int(dst), int(src), int(nbytes))

    def create_stream(self):
        return 1

    def stream_synchronize(self, ptr):
        pass

    def destroy_stream(self, ptr):
        pass


def engine_blob(onnx_path, graph: str, profile: dict) -> bytes:
    """What the emulated builder serialises: a header line (the graph and its profile
    {input: [min, opt, max]}) and the ONNX model itself, self-contained like a real engine."""
    head = json.dumps({"graph": graph, "profile": {n: [list(s) for s in v] for n, v in profile.items()}})
    with open(onnx_path, "rb") as f:
        return b"EMU:" + head.encode() + b"\n" + f.read()


class EmuContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addr = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False  # what TensorRT does outside the optimisation profile
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = int(ptr)

    def get_tensor_shape(self, name):
        dims = dict(self.engine.geometry)
        for t in self.engine.spec.inputs:
            for sym, v in zip(t.shape, self.shapes[t.name]):
                if isinstance(sym, str):
                    dims[sym] = v
        return next(t for t in self.engine.spec.outputs if t.name == name).resolve(dims)

    def _array(self, name, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(self.addr[name]), dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream):
        feeds = {t.name: self._array(t.name, self.shapes[t.name], self.engine.dtypes[t.name]).astype(t.dtype)
                 for t in self.engine.spec.inputs}  # the ONNX graph wants its int64 back
        outs = self.engine.session.run(None, feeds)
        for t, value in zip(self.engine.spec.outputs, outs):
            assert value.shape == self.get_tensor_shape(t.name), (t.name, value.shape)
            value = np.ascontiguousarray(value + PERTURB.get(self.engine.spec.name, 0), dtype=self.engine.dtypes[t.name])
            ctypes.memmove(self.addr[t.name], value.ctypes.data, value.nbytes)
        self.engine.calls += 1
        return True


class EmuEngine:
    def __init__(self, blob: bytes):
        import onnxruntime as ort

        head, model = bytes(blob[4:]).split(b"\n", 1)
        d = json.loads(head.decode())
        self.spec = GRAPHS[d["graph"]]
        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        self.profile = {n: [tuple(s) for s in v] for n, v in d["profile"].items()}
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        # the token grid from a fixed input: `feat` (1, 256, G, G) or `image` (1, 3, S, S)
        size = shapes["image"][-1] if "image" in shapes else 16 * shapes["feat"][-1] if "feat" in shapes else None
        self.geometry = geometry(size) if size else {}
        for t in self.spec.inputs:  # static inputs: a profile of their one shape
            if t.name not in self.profile:
                fixed = tuple(shapes[t.name])
                self.profile[t.name] = [fixed, fixed, fixed]
        self.names = self.spec.input_names + self.spec.output_names
        self.dtypes = {t.name: np.dtype(np.int32 if t.dtype == "int64" else t.dtype)
                       for t in self.spec.inputs + self.spec.outputs}
        self.num_io_tensors = len(self.names)
        self.calls = 0

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.spec.input_names else "out"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, index):
        return self.profile[name]

    def create_execution_context(self):
        return EmuContext(self)


# -- builder side -----------------------------------------------------------------------------

class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class _Network:
    def __init__(self):
        self.inputs, self.path = [], None

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class _Parser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        import onnx

        model = onnx.load(path, load_external_data=False)
        init = {i.name for i in model.graph.initializer}
        for inp in model.graph.input:
            if inp.name in init:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
            self.network.inputs.append(_Tensor(inp.name, dims))
        self.network.path = path
        return True

    def get_error(self, i):
        raise IndexError(i)


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [tuple(lo), tuple(opt), tuple(hi)]


class _TimingCache:
    def __init__(self, blob):
        self.blob = bytes(blob) or b"EMU-TIMING"

    def serialize(self):
        return self.blob


class _Config:
    def __init__(self):
        self.flags, self.profiles, self.pools = set(), [], {}
        self.builder_optimization_level = None
        self.default_device_type = None
        self.DLA_core = -1
        self.int8_calibrator = None
        self.timing_cache = None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def create_timing_cache(self, blob):
        return _TimingCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing_cache = cache
        return True

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)


def emulated_tensorrt(engines: list, builds: list):
    """A `tensorrt` module: `engines` collects deserialised engines, `builds` what each build got."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec("tensorrt") works
    trt.__version__ = EMU_TRT
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dt: dt
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", GPU_FALLBACK="GPU_FALLBACK")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.OnnxParser = _Parser

    class ILogger:
        Severity = types.SimpleNamespace(VERBOSE=0, INFO=1, WARNING=2, ERROR=3)

        def __init__(self):
            pass

    class Logger(ILogger):
        WARNING = 2

        def __init__(self, severity=2):
            pass

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            if not blob.startswith(b"EMU:"):
                return None  # TensorRT cannot read an engine from another version/GPU
            engines.append(EmuEngine(blob))
            engines[-1].dla_core = getattr(self, "DLA_core", None)  # what the session asked for
            return engines[-1]

    class Builder:
        def __init__(self, logger):
            logger.log(ILogger.Severity.INFO, "emulated builder")

        def create_network(self, flags=0):
            return _Network()

        def create_builder_config(self):
            return _Config()

        def create_optimization_profile(self):
            return _Profile()

        def build_serialized_network(self, network, config):
            graph = network.path.rsplit("/", 1)[-1][:-len(".onnx")]
            (profile,) = config.profiles
            builds.append({"graph": graph, "flags": set(config.flags), "profile": dict(profile.shapes),
                           "device": config.default_device_type, "dla_core": config.DLA_core,
                           "workspace": config.pools.get("WORKSPACE"), "int8_calibrator": config.int8_calibrator,
                           "level": config.builder_optimization_level})
            return engine_blob(network.path, graph, profile.shapes)

    trt.ILogger, trt.Logger, trt.Runtime, trt.Builder = ILogger, Logger, Runtime, Builder
    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt


def install(monkeypatch=None, gpu=None):
    """Swap in the emulated device; returns (engines, builds) lists the emulation fills.
    With a pytest monkeypatch the swap is undone after the test; without one (a child process,
    see `fake_trtexec`) it lasts for the process."""
    import polygraphy.cuda.cuda as poly_cuda

    from fastsam2.runtime import trt_backend

    engines, builds = [], []
    trt = emulated_tensorrt(engines, builds)
    if monkeypatch is None:
        sys.modules["tensorrt"] = trt
        poly_cuda.G_CUDA = HostCuda()
        trt_backend.current_gpu = lambda: dict(gpu or EMU_GPU)
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(poly_cuda, "G_CUDA", HostCuda())
        monkeypatch.setattr(trt_backend, "current_gpu", lambda: dict(gpu or EMU_GPU))
    return engines, builds


# -- build_plan.sh on the emulated device --------------------------------------------------------
# trtexec flags the plan may use (TensorRT 8.6/10 spellings); anything else is an error here
TRTEXEC_FLAGS = {"--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--fp16", "--int8",
                 "--calib", "--memPoolSize", "--builderOptimizationLevel", "--useDLACore",
                 "--allowGPUFallback", "--timingCacheFile"}


def trtexec_main(argv) -> int:
    """A stand-in for trtexec: checks the flags, builds an emulated engine with the profile the
    plan gives (min/opt/max shapes) and saves it where --saveEngine says."""
    opts = {}
    for a in argv:
        name, _, value = a.partition("=")
        if name not in TRTEXEC_FLAGS:
            print(f"unknown trtexec flag {a}", file=sys.stderr)
            return 2
        opts[name] = value
    shapes = {}
    for i, which in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
        for item in filter(None, opts.get(which, "").split(",")):
            n, dims = item.split(":")
            shapes.setdefault(n, [None] * 3)[i] = tuple(int(d) for d in dims.split("x"))
    onnx_path = opts["--onnx"]
    graph = onnx_path.rsplit("/", 1)[-1][:-len(".onnx")]
    with open(opts["--saveEngine"], "wb") as f:
        f.write(engine_blob(onnx_path, graph, shapes))
    return 0


def write_child_emulation(folder) -> dict:
    """A `trtexec` and a sitecustomize.py that put child processes on the emulated device.
    Returns the environment variables to run build_plan.sh with."""
    import os
    from pathlib import Path

    folder = Path(folder)
    here = Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import trt_emulation\ntrt_emulation.install()\n")
    exe = folder / "trtexec"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(here)!r})\n"
                   "import trt_emulation\nsys.exit(trt_emulation.trtexec_main(sys.argv[1:]))\n")
    exe.chmod(0o755)
    path = os.pathsep.join([str(folder), str(here), os.environ.get("PYTHONPATH", "")])
    return {"TRTEXEC": str(exe), "PYTHON": sys.executable, "PYTHONPATH": path}
