"""TensorRTSession on the emulated device, engine by engine: every graph matches ONNX Runtime
at its profile's min, max and opt shapes (buffers growing and shrinking; the full memory bank,
the most prompt points) on TensorRT 8.6 and 10.x, and is refused one past the max. Then the
bugs a GPU would catch, each applied to trt_backend's source: every one must make the engine
fail or differ from ONNX Runtime on the emulated device, and a harmless variant must not.
"""

from __future__ import annotations

import inspect
import types

import numpy as np
import pytest

pytest.importorskip("polygraphy")

import trt_emulation as emu  # noqa: E402
from fastsam2.runtime import trt_backend  # noqa: E402
from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, MAX_BATCH, dynamic_inputs, geometry, profile_shapes  # noqa: E402
from fastsam2.runtime.errors import InputError  # noqa: E402

SIZE = 256
SHAPES = profile_shapes(SIZE, 0.25, 0.5, 1.0)  # N 64..256, Ms 256..1792, M 260..1856, P 1..8


def feeds_at(graph: str, which: int, seed: int = 0) -> dict:
    """Random inputs at the profile's min (0), opt (1) or max (2) shapes; indices in the grid."""
    rng = np.random.default_rng(seed)
    t = geometry(SIZE)["T"]
    return {x.name: (rng.integers(0, t, SHAPES[graph][x.name][which]) if x.dtype == "int64"
                     else rng.standard_normal(SHAPES[graph][x.name][which]).astype(np.float32))
            for x in GRAPHS[graph].inputs}


@pytest.fixture(scope="module")
def cases(bundle_dir):
    """{graph: [(feeds, ONNX Runtime's outputs)]} at max, min, opt: growth, then shrinking."""
    import onnxruntime as ort

    out = {}
    for g in GRAPH_ORDER:
        sess = ort.InferenceSession(str(bundle_dir / f"{g}.onnx"), providers=["CPUExecutionProvider"])
        out[g] = []
        for which in ((2, 0, 1) if dynamic_inputs(g) else (1,)):
            f = feeds_at(g, which, seed=which)
            out[g].append((f, dict(zip(GRAPHS[g].output_names, sess.run(None, f)))))
    return out


def write_engine(bundle_dir, folder, graph, trt=emu.EMU_TRT, gpu=emu.EMU_GPU, dla_core=-1):
    path = folder / f"{graph}.engine"
    profile = {n: SHAPES[graph][n] for n in dynamic_inputs(graph)}
    path.write_bytes(emu.engine_blob(bundle_dir / f"{graph}.onnx", graph, profile, trt=trt, gpu=gpu,
                                     dla_core=dla_core))
    return path


def mismatch(session_cls, path, runs, dla_core=-1):
    """None when every run matches ONNX Runtime within the contract's tolerance; else what went wrong."""
    spec = GRAPHS[emu.engine_header(path.read_bytes())["graph"]]
    try:
        with session_cls(path, dla_core=dla_core) as s:
            for f, ref in runs:
                got = s.run(f)
                for o, r in ref.items():
                    err = float(np.max(np.abs(got[o] - r)))
                    if not err <= spec.tolerance(o, r, engine=True):
                        return f"{o}: max-abs error {err:.3g}"
    except Exception as e:  # noqa: BLE001 - any failure is the point
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


@pytest.mark.parametrize("trt_version", emu.TRT_VERSIONS)
def test_every_engine_at_its_profile_limits(monkeypatch, bundle_dir, tmp_path, cases, trt_version):
    em = emu.install(monkeypatch, trt_version=trt_version)
    for g in GRAPH_ORDER:
        path = write_engine(bundle_dir, tmp_path, g, trt=trt_version)
        assert mismatch(trt_backend.TensorRTSession, path, cases[g]) is None, g
    seen = {e.spec.name: e.seen for e in em.engines}
    assert seen["memory_attention"]["memory"] == (1856, 64) and seen["memory_attention"]["curr"] == (256, 256)
    assert seen["mask_decoder"]["point_coords"] == (MAX_BATCH, 8, 2)  # B objects, P points
    assert em.device.pending() == 0 and em.device.stats["synchronize"] == sum(len(c) for c in cases.values())
    # one past the max: refused before anything reaches the device, naming the range
    for g, name, past in (("memory_attention", "memory", (1857, 64)), ("mask_decoder", "point_coords", (1, 9, 2))):
        f = dict(cases[g][0][0])
        f[name] = np.zeros(past, np.float32)
        if name == "memory":
            f["memory_pos"] = f[name]
        said = rf"input {name} of shape \({past[0]}, .*outside the engine's optimisation profile"
        with trt_backend.TensorRTSession(tmp_path / f"{g}.engine") as s, pytest.raises(InputError, match=said):
            s.run(f)


RUN = inspect.getsource(trt_backend.TensorRTSession.run)
EXECUTE = RUN[RUN.index("        if not ctx.execute_async_v3"):RUN.index("        wanted = ")]

# (bug, source before, source after, TensorRT versions on which a GPU shows it)
BUGS = [
    ("outputs read before the stream is synchronised", "        stream.synchronize()\n", "", emu.TRT_VERSIONS),
    ("a host pointer given to TensorRT", "ctx.set_tensor_address(name, buf.ptr)",
     "ctx.set_tensor_address(name, arr.ctypes.data)", emu.TRT_VERSIONS),
    ("output buffers not grown to the output shapes", "            self._buffers[name].resize(shape)\n", "",
     emu.TRT_VERSIONS),
    ("an input copied before its buffer grew",
     "buf = self._buffers[name].resize(arr.shape)\n            buf.copy_from(arr, stream=stream)",
     "buf = self._buffers[name]\n            buf.copy_from(arr, stream=stream)\n            buf.resize(arr.shape)",
     emu.TRT_VERSIONS),
    ("outputs copied before the engine ran", EXECUTE + "        wanted = ",
     "        wanted = ", emu.TRT_VERSIONS),
    ("index inputs fed as int64 whatever the engine takes",
     "self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}",
     "self._dtypes = {n: np.dtype(np.int64 if n.endswith('_idx') else trt.nptype(self._engine.get_tensor_dtype(n))) "
     "for n in names}", (emu.TRT86,)),
]


def mutant(old: str, new: str, after: str = ""):
    """trt_backend with `old` replaced by `new` (and `after` put back before the output copies'
    synchronize, for a moved block): its TensorRTSession."""
    src = inspect.getsource(trt_backend)
    assert src.count(old) == 1, old
    src = src.replace(old, new)
    if after:
        src = src.replace("        stream.synchronize()\n", after + "        stream.synchronize()\n", 1)
    mod = types.ModuleType("trt_backend_mutant")
    exec(compile(src, trt_backend.__file__, "exec"), mod.__dict__)  # noqa: S102
    return mod.TensorRTSession


@pytest.mark.parametrize("trt_version", emu.TRT_VERSIONS)
def test_each_session_bug_fails_on_the_emulated_device(monkeypatch, bundle_dir, tmp_path, cases, trt_version):
    """memory_attention (dynamic shapes, index inputs) at max, min, opt: each bug fails there."""
    emu.install(monkeypatch, trt_version=trt_version)
    path = write_engine(bundle_dir, tmp_path, "memory_attention", trt=trt_version)
    runs = cases["memory_attention"]
    assert mismatch(trt_backend.TensorRTSession, path, runs) is None
    missed = []
    for bug, old, new, versions in BUGS:
        if trt_version not in versions:
            continue
        got = mismatch(mutant(old, new, EXECUTE if bug.startswith("outputs copied before") else ""), path, runs)
        if got is None:
            missed.append(bug)
    assert not missed, f"the emulated device let these through: {missed}"
    # harmless on a GPU too: synchronous output copies wait for the stream (legacy default stream)
    same = mutant("copy_to(host, stream=stream)", "copy_to(host)")
    assert mismatch(same, path, runs) is None


def test_dla_core_not_named_fails_on_the_emulated_orin(monkeypatch, bundle_dir, tmp_path, cases):
    emu.install(monkeypatch, gpu=emu.ORIN_GPU, trt_version=emu.TRT86)
    path = write_engine(bundle_dir, tmp_path, "memory_attention", trt=emu.TRT86, gpu=emu.ORIN_GPU, dla_core=0)
    runs = cases["memory_attention"][:1]
    assert mismatch(trt_backend.TensorRTSession, path, runs, dla_core=0) is None
    assert mismatch(trt_backend.TensorRTSession, path, runs, dla_core=2) is not None  # the Orin has 0 and 1
    bug = mutant("            self._runtime.DLA_core = dla_core\n", "            pass\n")
    assert "cannot load" in mismatch(bug, path, runs, dla_core=0)
