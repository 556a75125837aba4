"""The native TensorRT backend's plumbing on an emulated device (no GPU in CI).

What is real: `TensorRTSession`, `create_sessions("tensorrt")`, the engine/GPU compatibility
check, the whole `track()` loop, and Polygraphy's own `DeviceArray`/`Stream` code (its buffer
size and dtype checks included). What is emulated: CUDA (Polygraphy's global wrapper is swapped
for one that "allocates" host memory and copies with memmove) and the `tensorrt` module (an
"engine" file names an ONNX graph; executing it reads the inputs from the device addresses the
session set, runs onnxruntime, and writes the outputs back to the addresses the session set).
Like TensorRT 8.6, the emulated engines declare the int64 index inputs as int32.

So these tests prove the session's name-based I/O, dtype casts, buffer growth while N and M
change every frame, output shapes and error paths, not TensorRT's numerics or speed.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import types

import numpy as np
import pytest

pytest.importorskip("polygraphy")
import polygraphy.cuda.cuda as poly_cuda  # noqa: E402

from fastsam2.runtime import trt_backend  # noqa: E402
from fastsam2.runtime.contract import GRAPHS, GRAPH_ORDER, profile_shapes  # noqa: E402
from fastsam2.runtime.errors import BundleError, InputError  # noqa: E402
from fastsam2.runtime.track import PromptSpec, track  # noqa: E402

EMU_GPU = {"gpu_name": "Emulated GPU", "compute_capability": "9.0"}
EMU_TRT = "10.0.0-emulated"


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


class EmuContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addr = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False  # what TensorRT does outside the optimisation profile
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = int(ptr)

    def _dims(self):
        dims = dict(self.engine.geometry)
        for t in self.engine.spec.inputs:
            for sym, v in zip(t.shape, self.shapes[t.name]):
                if isinstance(sym, str):
                    dims[sym] = v
        return dims

    def get_tensor_shape(self, name):
        spec = next(t for t in self.engine.spec.outputs if t.name == name)
        return spec.resolve(self._dims())

    def _array(self, name, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(self.addr[name]), dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream):
        feeds = {}
        for t in self.engine.spec.inputs:
            a = self._array(t.name, self.shapes[t.name], self.engine.dtypes[t.name])
            feeds[t.name] = a.astype(t.dtype)  # the ONNX graph wants int64 back
        outs = self.engine.session.run(None, feeds)
        for t, value in zip(self.engine.spec.outputs, outs):
            assert value.shape == self.get_tensor_shape(t.name), (t.name, value.shape)
            value = np.ascontiguousarray(value, dtype=self.engine.dtypes[t.name])
            ctypes.memmove(self.addr[t.name], value.ctypes.data, value.nbytes)
        self.engine.calls += 1
        return True


class EmuEngine:
    def __init__(self, onnx_path, graph, image_size):
        import onnxruntime as ort

        self.spec = GRAPHS[graph]
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        from fastsam2.runtime.contract import geometry

        self.geometry = geometry(image_size)
        self.profile = profile_shapes(image_size, 0.25, 0.5, 1.0)[graph]
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


def emulated_tensorrt(engines: list):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = EMU_TRT
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dt: dt

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            if not blob.startswith(b"EMU:"):
                return None  # TensorRT cannot read an engine from another version/GPU
            path, graph, size = blob[4:].decode().split("|")
            engines.append(EmuEngine(path, graph, int(size)))
            return engines[-1]

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


@pytest.fixture
def emulated_device(monkeypatch):
    engines = []
    monkeypatch.setitem(sys.modules, "tensorrt", emulated_tensorrt(engines))
    monkeypatch.setattr(poly_cuda, "G_CUDA", HostCuda())
    monkeypatch.setattr(trt_backend, "current_gpu", lambda: dict(EMU_GPU))
    return engines


@pytest.fixture
def engine_bundle(tmp_path, bundle_dir):
    """The tiny bundle plus "engines" built for the emulated GPU, recorded in its manifest as
    fastsam2-export records a local build."""
    b = tmp_path / "b"
    shutil.copytree(bundle_dir, b)
    m = json.loads((b / "manifest.json").read_text())
    edir = b / "engines" / "hopper"
    edir.mkdir(parents=True)
    graphs = {}
    for g in GRAPH_ORDER:
        (edir / f"{g}.engine").write_bytes(f"EMU:{b / m['graphs'][g]['file']}|{g}|{m['image_size']}".encode())
        graphs[g] = {"file": f"engines/hopper/{g}.engine"}
    m["engines"] = {"target": "hopper", "keep_range": [0.3, 1.0], "precision": "fp16", "built": True,
                    **EMU_GPU, "tensorrt_version": EMU_TRT, "graphs": graphs}
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def _run(bundle, synth, out, backend, keep=0.5, frames=None):
    return track(synth.frames_dir_or_file, bundle, PromptSpec(points=[synth.first_frame_points[1]]),
                 out, keep=keep, backend=backend, overlay=False, max_frames=frames, warn=lambda _: None)


def test_tensorrt_backend_tracks_like_onnxruntime(emulated_device, engine_bundle, synth, tmp_path):
    res = _run(engine_bundle, synth, tmp_path / "trt", "tensorrt")
    ref = _run(engine_bundle, synth, tmp_path / "ort", "ort-cpu")
    assert res["backend"] == "tensorrt" and ref["backend"] == "ort-cpu"
    assert len(res["frames"]) == len(ref["frames"]) == len(list((tmp_path / "trt" / "masks").glob("*.png")))
    for a, b in zip(res["frames"], ref["frames"]):
        assert a["kept_tokens"] == b["kept_tokens"]
        assert a["mask_area"] == b["mask_area"] and a["bbox"] == b["bbox"]
        assert a["object_score"] == pytest.approx(b["object_score"], abs=1e-3)
    # every graph ran through its engine; memory attention saw N and M change (1..7 memories)
    by_graph = {e.spec.name: e.calls for e in emulated_device}
    assert all(c > 0 for c in by_graph.values()) and len(by_graph) == len(GRAPH_ORDER)


def test_auto_picks_tensorrt_when_engines_match(emulated_device, engine_bundle, synth, tmp_path):
    assert _run(engine_bundle, synth, tmp_path / "r", "auto", frames=2)["backend"] == "tensorrt"


def test_engine_from_another_gpu_is_refused(emulated_device, engine_bundle, synth, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_backend, "current_gpu", lambda: {"gpu_name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(BundleError, match=r"built for GPU 'Emulated GPU', this machine has 'Orin'"):
        _run(engine_bundle, synth, tmp_path / "r", "tensorrt", frames=2)


def test_unreadable_engine_is_one_line(emulated_device, engine_bundle, synth, tmp_path):
    (engine_bundle / "engines" / "hopper" / "router.engine").write_bytes(b"not an engine")
    with pytest.raises(BundleError) as e:
        _run(engine_bundle, synth, tmp_path / "r", "tensorrt", frames=2)
    assert "cannot load" in str(e.value) and "\n" not in str(e.value)


def test_keep_outside_the_engine_profile(emulated_device, engine_bundle, synth, tmp_path):
    with pytest.raises(InputError, match=r"outside the engines' profile range 0.3..1.0"):
        _run(engine_bundle, synth, tmp_path / "r", "tensorrt", keep=0.2, frames=2)
    # a shape the engine's profile does not cover is refused at run time too, naming the range
    s = trt_backend.TensorRTSession(engine_bundle / "engines" / "hopper" / "memory_attention.engine")
    feeds = {t.name: np.zeros(t.resolve({"N": 300, "M": 300, "Ms": 296}), t.dtype)
             for t in GRAPHS["memory_attention"].inputs}
    with pytest.raises(InputError, match=r"outside the engine's optimisation profile"):
        s.run(feeds)
    s.close()
