"""Native TensorRT backend: run one serialized engine on numpy arrays.

Never imports torch (runtime rule) and never pycuda: device memory and streams come from
`polygraphy.cuda`, which wraps libcudart through ctypes. tensorrt and polygraphy are imported
inside functions, so this module imports on any machine; using it without them raises
BackendError.

The engine API is TensorRT's name-based tensor API (`num_io_tensors`, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`): present from 8.5, the only one left in 10.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from pathlib import Path

import numpy as np

from fastsam2.runtime.errors import BackendError, BundleError, InputError

_INSTALL_HINT = (
    "TensorRT backend needs `pip install fastsam2[trt]` (tensorrt + polygraphy; on Jetson "
    "tensorrt comes with JetPack) and an NVIDIA GPU"
)

# cudaDeviceAttr values from the CUDA runtime headers (stable since CUDA 5)
_CUDA_ATTR_CC_MAJOR, _CUDA_ATTR_CC_MINOR = 75, 76


def _import_trt():
    """(tensorrt, polygraphy.cuda), or BackendError naming what to install."""
    try:
        import tensorrt as trt
        from polygraphy import cuda
    except (ImportError, OSError) as e:  # OSError: a wheel whose CUDA/TensorRT libraries are missing
        raise BackendError(f"{_INSTALL_HINT}; here: {str(e).splitlines()[0] if str(e) else e!r}") from None
    return trt, cuda


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    return trt.__version__


def _cudart():
    """The CUDA runtime library (as polygraphy loaded it, else from the library path), or None."""
    try:
        from polygraphy import cuda

        handle = cuda.wrapper().handle
        if handle is not None:
            return handle
    except Exception:  # ImportError, or polygraphy's own error when libcudart is missing
        pass
    import ctypes.util

    # the runtime-only install has no polygraphy; JetPack and CUDA installs keep libcudart here
    for name in (ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12",
                 "libcudart.so.13", "libcudart.so.11.0", "/usr/local/cuda/lib64/libcudart.so"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def _gpu_from_cudart(lib) -> dict | None:
    count = ctypes.c_int(0)
    if lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cudaDeviceGetAttribute(ctypes.byref(major), _CUDA_ATTR_CC_MAJOR, 0)
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), _CUDA_ATTR_CC_MINOR, 0)
    # cudaDeviceProp starts with `char name[256]` in every CUDA version; the rest of the struct
    # changes size between versions, so give it a generous buffer and read only the name.
    prop = ctypes.create_string_buffer(8192)
    getter = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    if getter(prop, 0) != 0:
        return None
    name = prop.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return {"gpu_name": name, "compute_capability": f"{major.value}.{minor.value}"}


def _gpu_from_nvidia_smi() -> dict | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines or "," not in lines[0]:
        return None
    name, cc = (s.strip() for s in lines[0].rsplit(",", 1))
    return {"gpu_name": name, "compute_capability": cc}


def current_gpu() -> dict | None:
    """{"gpu_name", "compute_capability"} of CUDA device 0 (what TensorRT builds for), or None.

    libcudart first: it works on Jetson, whose nvidia-smi lacks most queries; nvidia-smi after.
    """
    lib = _cudart()
    if lib is not None:
        try:
            info = _gpu_from_cudart(lib)
        except (AttributeError, OSError):
            info = None
        if info:
            return info
    return _gpu_from_nvidia_smi()


def tensorrt_available() -> bool:
    """True when tensorrt and polygraphy import and a CUDA GPU is visible."""
    try:
        _import_trt()
    except BackendError:
        return False
    return current_gpu() is not None


def engine_environment() -> dict:
    """What an engine is tied to, for this machine: GPU name, compute capability, TRT version."""
    gpu = current_gpu() or {"gpu_name": None, "compute_capability": None}
    return {**gpu, "tensorrt_version": tensorrt_version()}


def check_engine_compat(manifest_engine_info: dict, current: dict | None = None) -> None:
    """Refuse engines built on another GPU or TensorRT version (TensorRT cannot load them).

    `manifest_engine_info` is what `fastsam2.export.tensorrt.build_engines` recorded;
    `current` defaults to `engine_environment()` (tests pass their own).
    """
    current = engine_environment() if current is None else current
    target = manifest_engine_info.get("target", "?")
    for key, what in (("gpu_name", "GPU"), ("tensorrt_version", "TensorRT")):
        built, here = manifest_engine_info.get(key), current.get(key)
        if built != here:
            raise BundleError(
                f"engines for target {target} were built for {what} {built!r}, this machine has "
                f"{here!r}; rebuild them here (engines/{target}/build_plan.sh) or use the ONNX backend"
            )


class TensorRTSession:
    """One engine, run like an onnxruntime session: `run({name: array}) -> {name: array}`.

    Inputs are cast to the engine's dtypes: TensorRT 8.6 turns the graphs' int64 index inputs
    into int32, TensorRT 10 keeps int64.
    """

    def __init__(self, engine_path, dla_core: int = -1):
        trt, cuda = _import_trt()
        self._trt, self._cuda = trt, cuda
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise BundleError(f"no TensorRT engine at {self.engine_path}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if dla_core >= 0:
            # an engine built for a DLA core runs on the core the runtime names (Jetson Orin: 0, 1)
            self._runtime.DLA_core = dla_core
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            dla = f", or on DLA core {dla_core}, which this device lacks" if dla_core >= 0 else ""
            raise BundleError(
                f"TensorRT {trt.__version__} cannot load {self.engine_path}: built for another "
                f"GPU or TensorRT version{dla}; rebuild it on this machine"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._stream = cuda.Stream()
        # grown on demand, reused across calls: N and M change every frame
        self._buffers = {n: cuda.DeviceArray(shape=(0,), dtype=self._dtypes[n]) for n in names}

    def _profile_range(self, name):
        try:
            lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
            return f"{tuple(lo)}..{tuple(hi)}"
        except Exception:  # only used to word an error
            return "?"

    def run(self, feeds: dict, output_names=None) -> dict:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"{self.engine_path.name}: missing inputs {', '.join(missing)}")
        ctx, stream = self._context, self._stream
        host_inputs = []  # kept alive until the stream has copied them
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            if not ctx.set_input_shape(name, tuple(int(d) for d in arr.shape)):
                raise InputError(
                    f"{self.engine_path.name}: input {name} of shape {arr.shape} is outside the "
                    f"engine's optimisation profile {self._profile_range(name)}, which the target's "
                    "keep range and prompt-point count set; rebuild the engines for a wider one"
                )
            # grow first: polygraphy refuses a host array larger than the device buffer
            buf = self._buffers[name].resize(arr.shape)
            buf.copy_from(arr, stream=stream)
            ctx.set_tensor_address(name, buf.ptr)
            host_inputs.append(arr)

        shapes = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.engine_path.name}: output {name} has unresolved shape {shape}")
            self._buffers[name].resize(shape)
            ctx.set_tensor_address(name, self._buffers[name].ptr)
            shapes[name] = shape

        if not ctx.execute_async_v3(stream.ptr):
            raise BackendError(f"{self.engine_path.name}: TensorRT execution failed")
        wanted = self.output_names if output_names is None else list(output_names)
        outputs = {}
        for name in wanted:
            host = np.empty(shapes[name], dtype=self._dtypes[name])
            outputs[name] = self._buffers[name].copy_to(host, stream=stream)
        stream.synchronize()
        del host_inputs
        return outputs

    def close(self) -> None:
        for buf in getattr(self, "_buffers", {}).values():
            buf.free()
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            self._stream.free()
            self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def record_engines(bundle_dir) -> dict:
    """After build_plan.sh built the engines on the device: write engines/<target>/engines.json
    (GPU, compute capability, TensorRT version, engine sha256s), which the runtime reads as it
    reads engines built at export. Returns what it wrote (and says so in this module's logger)."""
    from fastsam2.runtime.bundle import ENGINES_RECORD, load_bundle, sha256_file
    from fastsam2.runtime.contract import GRAPH_ORDER
    from fastsam2.runtime.outputs import atomic_write_json

    bundle = load_bundle(bundle_dir)
    info = bundle.manifest.get("engines") or {}
    target = info.get("target")
    if not target:
        raise BundleError(f"bundle {bundle.path} was exported for a target without TensorRT engines")
    env = engine_environment()
    if env["tensorrt_version"] is None:
        raise BackendError(f"recording engines needs the tensorrt Python package, which runs them: {_INSTALL_HINT}")
    if env["gpu_name"] is None:
        raise BackendError("recording engines needs the GPU that built them; no CUDA GPU is visible")
    folder = bundle.engines_dir(target)  # inside the bundle, after links
    missing = [f"{g}.engine" for g in GRAPH_ORDER if not (folder / f"{g}.engine").is_file()]
    if missing:
        raise BundleError(f"{folder} lacks {', '.join(missing)}: run build_plan.sh there first")
    record = {"target": target, "built": True, **env, "source": "build_plan.sh",
              "graphs": {g: {"file": f"engines/{target}/{g}.engine",
                             "sha256": sha256_file(folder / f"{g}.engine")} for g in GRAPH_ORDER}}
    atomic_write_json(folder / ENGINES_RECORD, record)
    logging.getLogger(__name__).info(
        f"recorded {len(GRAPH_ORDER)} engines for {env['gpu_name']} (sm {env['compute_capability']}, "
        f"TensorRT {env['tensorrt_version']}) in {folder / ENGINES_RECORD}")
    return record
