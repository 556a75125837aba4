"""An emulated CUDA device and `tensorrt` module (8.6 or 10.x API), for testing fastsam2's
TensorRT code without a GPU, and strict where a GPU is.

What stays real: fastsam2's code (engine builds, build plan, manifest, TensorRTSession, GPU
detection through libcudart's API, the tracking loop) and Polygraphy's DeviceArray/Stream.
What is emulated, and how it fails where a GPU would:
- CUDA (trt_emulation_cuda.py, in place of Polygraphy's global wrapper): device memory apart
  from host memory and uninitialised until written, copies checked for direction and size, work
  on a stream run only when it is synchronised (output copies leave 0xFF until then). Its
  `handle` answers libcudart's device queries, so `trt_backend.current_gpu` runs unpatched.
- TensorRT (`emulated_tensorrt`): the builder parses the ONNX inputs (-1 for dynamic axes; 8.6
  wants an explicit-batch network), validates the optimisation profile as TensorRT does (every
  dynamic input, min <= opt <= max, static dims kept), DLA only on a device with DLA cores and with
  GPU fallback, int8 only with a calibration cache. Its engine records graph, profile, precision,
  DLA core, TensorRT version and compute capability, and loads only where both match. Index
  inputs are int64 on 10.x and int32 on 8.6. The context enforces the profile, wants every tensor
  address on a device block large enough, and computes with onnxruntime when its stream runs.
- trtexec (trt_emulation_build.py): checks each flag's value, then builds through the builder.

This proves plumbing: names, shapes, dtypes, buffers, copies, synchronisation, profiles, flags,
files, manifest. Not TensorRT's parser coverage, tactics, fp16/int8 numerics, memory or speed.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass, field

import numpy as np

from fastsam2.runtime.contract import GRAPHS, geometry
from trt_emulation_cuda import EmulatedCudaError, EmulatedDevice

EMU_GPU = {"gpu_name": "Emulated GPU", "compute_capability": "9.0"}
ORIN_GPU = {"gpu_name": "Orin (nvgpu)", "compute_capability": "8.7", "dla_cores": 2}
EMU_TRT = "10.0.0-emulated"
TRT86 = "8.6.1-emulated"  # JetPack 6.0
TRT_VERSIONS = (TRT86, EMU_TRT)
PERTURB = {}  # graph -> offset the emulated engine adds to its outputs, or f(shapes) -> offset


def engine_blob(onnx_path, graph: str, profile: dict, trt=EMU_TRT, gpu=EMU_GPU, precision="fp32",
                dla_core=-1, **build) -> bytes:
    """What the emulated builder serialises: a header line (graph, profile {input: [min, opt,
    max]}, the TensorRT version and compute capability it is tied to, what it was built with)
    and the ONNX model itself, self-contained like a real engine."""
    head = {"graph": graph, "profile": {n: [list(s) for s in v] for n, v in profile.items()}, "trt": trt,
            "compute_capability": gpu["compute_capability"], "precision": precision, "dla_core": dla_core,
            **build}
    with open(onnx_path, "rb") as f:
        return b"EMU:" + json.dumps(head).encode() + b"\n" + f.read()


def engine_header(blob: bytes) -> dict:
    return json.loads(bytes(blob[4:bytes(blob).index(b"\n")]))


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
        """An output's shape from the input shapes set so far; -1 where they do not tell."""
        dims = dict(self.engine.geometry)
        for t in self.engine.spec.inputs:
            for sym, v in zip(t.shape, self.shapes.get(t.name, ())):
                if isinstance(sym, str):
                    dims[sym] = v
        shape = next(t for t in self.engine.spec.outputs if t.name == name).resolve(dims)
        return tuple(d if isinstance(d, int) else -1 for d in shape)

    def execute_async_v3(self, stream):
        e = self.engine
        unset = [n for n in e.spec.input_names if n not in self.shapes]
        if unset:
            return e.error(f"input shapes not set: {', '.join(unset)}")
        shapes = {**{n: self.shapes[n] for n in e.spec.input_names},
                  **{n: self.get_tensor_shape(n) for n in e.spec.output_names}}
        for n, shape in shapes.items():
            nbytes = int(np.prod(shape)) * e.dtypes[n].itemsize
            if n not in self.addr:
                return e.error(f"neither address nor allocator is set for tensor {n}")
            if e.device.block(self.addr[n], nbytes) is None:
                return e.error(f"tensor {n} {shape} needs {nbytes} bytes of device memory at "
                               f"{self.addr[n]:#x}: not a device allocation that large")
        addr = dict(self.addr)  # TensorRT reads the addresses when the work is queued
        e.device.enqueue(stream, "an engine execution", lambda: self._compute(addr, shapes))
        return True

    def _compute(self, addr, shapes):
        e = self.engine

        def array(name):
            n = int(np.prod(shapes[name])) * e.dtypes[name].itemsize
            if e.device.block(addr[name], n) is None:
                raise EmulatedCudaError(f"{e.spec.name}: tensor {name} was freed before the engine ran")
            raw = (ctypes.c_char * n).from_address(addr[name])
            return np.frombuffer(raw, dtype=e.dtypes[name]).reshape(shapes[name])

        # the ONNX graph wants its int64 back
        feeds = {t.name: array(t.name).astype(t.dtype) for t in e.spec.inputs}
        for t in e.spec.inputs:
            e.seen[t.name] = max(e.seen.get(t.name, shapes[t.name]), shapes[t.name])
        for t, value in zip(e.spec.outputs, e.session.run(None, feeds)):
            assert value.shape == shapes[t.name], (t.name, value.shape)
            drift = PERTURB.get(e.spec.name, 0)
            drift = drift(shapes) if callable(drift) else drift
            value = np.ascontiguousarray(value + drift, dtype=e.dtypes[t.name])
            array(t.name)  # still allocated
            ctypes.memmove(addr[t.name], value.ctypes.data, value.nbytes)
        e.calls += 1


class EmuEngine:
    def __init__(self, blob: bytes, trt, device, logger):
        import onnxruntime as ort

        head, model = bytes(blob[4:]).split(b"\n", 1)
        self.header = json.loads(head.decode())
        self.device, self.logger, self.trt = device, logger, trt
        self.spec = GRAPHS[self.header["graph"]]
        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        self.profile = {n: [tuple(s) for s in v] for n, v in self.header["profile"].items()}
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        # the token grid from a fixed input: `feat` (1, 256, G, G) or `image` (1, 3, S, S)
        size = shapes["image"][-1] if "image" in shapes else 16 * shapes["feat"][-1] if "feat" in shapes else None
        self.geometry = geometry(size) if size else {}
        for t in self.spec.inputs:  # static inputs: a profile of their one shape
            if t.name not in self.profile:
                fixed = tuple(shapes[t.name])
                self.profile[t.name] = [fixed, fixed, fixed]
        self.names = self.spec.input_names + self.spec.output_names
        # TensorRT 8.6 has no int64 tensors: its parser turns int64 inputs into int32
        index = np.int64 if trt.major >= 10 else np.int32
        self.dtypes = {t.name: np.dtype(index if t.dtype == "int64" else t.dtype)
                       for t in self.spec.inputs + self.spec.outputs}
        self.num_io_tensors = len(self.names)
        self.calls, self.seen = 0, {}  # executions; largest shape each input was run at

    def error(self, msg):
        self.logger.log(self.trt.ILogger.Severity.ERROR, f"{self.spec.name}: {msg}")
        return False

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self.spec.input_names else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType.from_numpy(self.dtypes[name])

    def get_tensor_profile_shape(self, name, index):
        return self.profile[name]

    def create_execution_context(self):
        return EmuContext(self)


def emulated_tensorrt(device, version: str, engines: list, builds: list):
    """A `tensorrt` module of `version` on `device`: `engines` collects deserialised engines,
    `builds` what each build got (see trt_emulation_build for the builder)."""
    from trt_emulation_build import add_builder

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec("tensorrt") works
    trt.__version__, trt.major, trt.device = version, int(version.split(".")[0]), device
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    # 8.6 has no INT64
    members = {"FLOAT": "float32", "INT32": "int32", **({"INT64": "int64"} if trt.major >= 10 else {})}
    DataType = enum.Enum("DataType", members)  # noqa: N806
    DataType.from_numpy = classmethod(lambda cls, dt: cls(np.dtype(dt).name))
    trt.DataType = DataType
    trt.nptype = lambda dt: np.dtype(DataType(dt).value).type  # TypeError on what the version lacks

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self):
            pass

    class Logger(ILogger):
        WARNING = ILogger.Severity.WARNING

        def __init__(self, severity=2):
            self.messages = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))

    class Runtime:
        DLA_core = -1

        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            why = None
            if not bytes(blob[:4]) == b"EMU:":
                why = "not an engine (magic tag mismatch)"
            else:
                head = engine_header(blob)
                if head["trt"] != version:
                    why = f"the engine was built by TensorRT {head['trt']}, this is {version}"
                elif head["compute_capability"] != device.gpu["compute_capability"]:
                    why = (f"the engine was built for sm {head['compute_capability']}, this GPU is "
                           f"sm {device.gpu['compute_capability']}")
                elif head["dla_core"] >= 0 and not 0 <= self.DLA_core < device.dla_cores:
                    why = f"DLA engine, but this runtime's DLA core {self.DLA_core} is not one of {device.dla_cores}"
            if why:
                self.logger.log(ILogger.Severity.ERROR, f"deserializeCudaEngine: {why}")
                return None  # TensorRT returns no engine
            engines.append(EmuEngine(blob, trt, device, self.logger))
            engines[-1].dla_core = self.DLA_core  # what the session asked for
            return engines[-1]

    trt.ILogger, trt.Logger, trt.Runtime = ILogger, Logger, Runtime
    add_builder(trt, builds)
    return trt


def reseal(path):
    """After editing a bundle on purpose: its seal (where the runtime has one) again."""
    from fastsam2.runtime import bundle

    getattr(bundle, "reseal", lambda p: None)(path)


def make_engine_bundle(dst, bundle_dir, trt_version=EMU_TRT, gpu=EMU_GPU, dla_core=-1):
    """A copy of a bundle plus "engines" built for the emulated GPU (target hopper, keep range
    0.25..1.0, fp16), recorded in its manifest as fastsam2-export records a local build."""
    import shutil

    from fastsam2.runtime.contract import GRAPH_ORDER, dynamic_inputs, profile_shapes

    shutil.copytree(bundle_dir, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edir = dst / "engines" / "hopper"
    edir.mkdir(parents=True)
    graphs = {}
    shapes = profile_shapes(m["image_size"], 0.25, 0.5, 1.0)
    for g in GRAPH_ORDER:
        profile = {n: shapes[g][n] for n in dynamic_inputs(g)}
        blob = engine_blob(dst / m["graphs"][g]["file"], g, profile, trt=trt_version, gpu=gpu,
                           precision="fp16", dla_core=dla_core)
        (edir / f"{g}.engine").write_bytes(blob)
        graphs[g] = {"file": f"engines/hopper/{g}.engine"}
    m["engines"] = {"target": "hopper", "keep_range": [0.3, 1.0], "precision": "fp16", "built": True,
                    "dla_core": dla_core, "gpu_name": gpu["gpu_name"],
                    "compute_capability": gpu["compute_capability"], "tensorrt_version": trt_version,
                    "graphs": graphs}
    (dst / "manifest.json").write_text(json.dumps(m))
    reseal(dst)
    return dst


@dataclass
class Emulation:
    device: EmulatedDevice
    trt: types.ModuleType = None
    engines: list = field(default_factory=list)  # every engine deserialised
    builds: list = field(default_factory=list)  # what every build got


def install(monkeypatch=None, gpu=None, trt_version=EMU_TRT) -> Emulation:
    """Swap in the emulated device and TensorRT `trt_version`; returns what the emulation fills.
    With a pytest monkeypatch the swap is undone after the test; without one (a child process,
    see `write_child_emulation`) it lasts for the process."""
    import polygraphy.cuda.cuda as poly_cuda

    em = Emulation(EmulatedDevice(gpu or EMU_GPU))
    em.trt = emulated_tensorrt(em.device, trt_version, em.engines, em.builds)
    if monkeypatch is None:
        sys.modules["tensorrt"] = em.trt
        poly_cuda.G_CUDA = em.device
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", em.trt)
        monkeypatch.setattr(poly_cuda, "G_CUDA", em.device)
    return em


def write_child_emulation(folder, gpu=None, trt_version=EMU_TRT) -> dict:
    """A `trtexec` and a sitecustomize.py that put child processes on the emulated device.
    Returns the environment variables to run build_plan.sh with."""
    import os
    from pathlib import Path

    folder = Path(folder)
    here = Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import trt_emulation\ntrt_emulation.install(gpu={dict(gpu or EMU_GPU)!r}, trt_version={trt_version!r})\n")
    exe = folder / "trtexec"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(here)!r})\n"
                   "import trt_emulation_build\nsys.exit(trt_emulation_build.trtexec_main(sys.argv[1:]))\n")
    exe.chmod(0o755)
    path = os.pathsep.join([str(folder), str(here), os.environ.get("PYTHONPATH", "")])
    return {"TRTEXEC": str(exe), "PYTHON": sys.executable, "PYTHONPATH": path}
