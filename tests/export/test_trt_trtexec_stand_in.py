"""The build plan's trtexec lines against the stand-in trtexec on the emulated device
(tests/trt_emulation_build.py), in process: every target's lines build on its own device under
TensorRT 8.6 and 10.x, and each kind of wrong flag value the stand-in checks (shapes against the
ONNX inputs and the profile rules, precision, DLA core against the device, pool units,
optimisation level) is refused with one line, as trtexec or its builder would refuse it.
"""

from __future__ import annotations

import shlex

import pytest

pytest.importorskip("polygraphy")

import trt_emulation as emu  # noqa: E402
import trt_emulation_build as emu_build  # noqa: E402
from fastsam2.export.tensorrt import shape_profiles, write_build_plan  # noqa: E402
from fastsam2.profiles import list_targets, load_profile  # noqa: E402

GPU_TARGETS = [t for t in list_targets() if load_profile(t).tensorrt]
# the image encoder's line is the router's with another name (both static): skip its 100 MB
GRAPHS_HERE = ("router", "memory_attention", "memory_encoder", "mask_decoder")


def device_of(target) -> dict:
    p = load_profile(target)
    return {"gpu_name": p.device, "compute_capability": p.compute_capability,
            "dla_cores": 2 if p.dla_core >= 0 else 0}


def plan_lines(tmp_path, bundle_dir, target) -> dict:
    """{graph: trtexec argv} of the target's build plan, run from its folder as the plan does."""
    root = tmp_path / target
    root.mkdir()
    for f in bundle_dir.glob("*.onnx"):
        (root / f.name).symlink_to(f)
    p = load_profile(target)
    plan = write_build_plan(root, p, shape_profiles(p, 256, 0.5))
    lines = {}
    for ln in plan.read_text().splitlines():
        if "--saveEngine=" in ln:
            argv = shlex.split(ln.strip())[1:]  # after "$TRTEXEC"
            lines[argv[0].split("../../")[1][:-len(".onnx")]] = argv
    return plan.parent, lines


@pytest.mark.parametrize("trt_version", emu.TRT_VERSIONS)
def test_every_targets_plan_builds_on_its_device(monkeypatch, tmp_path, bundle_dir, trt_version, capsys):
    for target in GPU_TARGETS:
        em = emu.install(monkeypatch, gpu=device_of(target), trt_version=trt_version)
        folder, lines = plan_lines(tmp_path, bundle_dir, target)
        monkeypatch.chdir(folder)
        p = load_profile(target)
        for g in GRAPHS_HERE:
            assert emu_build.trtexec_main(lines[g]) == 0, (target, g, capsys.readouterr().err)
            head = emu.engine_header((folder / f"{g}.engine").read_bytes())
            assert (head["trt"], head["precision"], head["dla_core"]) == (trt_version, p.precision, p.dla_core)
        assert [b["graph"] for b in em.builds] == list(GRAPHS_HERE)
        assert (folder / "timing.cache").read_bytes() == em.trt.timing_tag


def _set(argv, flag, value=None):
    """argv with `flag` set to `value` (None: removed; "" for a switch: present)."""
    out = [a for a in argv if a.partition("=")[0] != flag]
    if value is not None:
        out.append(flag if value == "" else f"{flag}={value}")
    return out


def _get(argv, flag):
    return next(a.partition("=")[2] for a in argv if a.partition("=")[0] == flag)


def _swap_min_max(argv):
    return _set(_set(argv, "--minShapes", _get(argv, "--maxShapes")), "--maxShapes", _get(argv, "--minShapes"))


# (what is wrong, graph, argv -> broken argv, the stand-in's words)
BROKEN = [
    ("min > max", "memory_attention", _swap_min_max, "invalid optimization profile"),
    ("no max shapes", "memory_attention", lambda a: _set(a, "--maxShapes"),
     "needs --minShapes, --optShapes and --maxShapes"),
    ("unknown input", "memory_attention",
     lambda a: _set(a, "--optShapes", _get(a, "--optShapes").replace("curr:", "cur:")),
     "names 'cur', which is not an input"),
    ("static dim changed", "memory_attention",
     lambda a: [x.replace("x256", "x255") if x.startswith("--") and "Shapes=" in x else x for x in a],
     "engine could not be built"),
    ("shapes for a static graph", "image_encoder", lambda a: a + ["--minShapes=image:1x3x256x256"],
     "static model does not take explicit shapes"),
    ("a switch with a value", "router", lambda a: _set(a, "--fp16", "1"), "takes no value"),
    ("int8 without a cache", "router", lambda a: _set(a, "--int8", ""), "--int8 needs --calib"),
    ("int8 cache missing", "router", lambda a: _set(_set(a, "--int8", ""), "--calib", "calibration_router.cache"),
     "no calibration cache there"),
    ("a DLA core the Orin lacks", "router", lambda a: _set(a, "--useDLACore", "2"), "engine could not be built"),
    ("DLA without GPU fallback", "mask_decoder", lambda a: _set(a, "--allowGPUFallback"), "engine could not be built"),
    ("GPU fallback without DLA", "router", lambda a: _set(_set(a, "--useDLACore"), "--allowGPUFallback", ""),
     "--allowGPUFallback without --useDLACore"),
    ("pool size without unit on 10.x", "router", lambda a: _set(a, "--memPoolSize", "workspace:4096"),
     "TensorRT 10 wants a unit"),
    ("unknown pool", "router", lambda a: _set(a, "--memPoolSize", "workspce:4096M"), "pool must be one of"),
    ("optimisation level 7", "router", lambda a: _set(a, "--builderOptimizationLevel", "7"),
     "engine could not be built"),
    ("unknown flag", "router", lambda a: a + ["--best"], "unknown flag --best"),
    ("a flag twice", "router", lambda a: a + [a[-1]], "given twice"),
]


def test_wrong_flag_values_are_refused(monkeypatch, tmp_path, bundle_dir, capsys):
    """On the Orin (2 DLA cores) under TensorRT 10, from the jetson-orin plan's own lines."""
    emu.install(monkeypatch, gpu=emu.ORIN_GPU, trt_version=emu.EMU_TRT)
    folder, lines = plan_lines(tmp_path, bundle_dir, "jetson-orin")
    monkeypatch.chdir(folder)
    let_through = []
    for what, g, broken, words in BROKEN:
        capsys.readouterr()
        rc = emu_build.trtexec_main(broken(lines[g]))
        err = capsys.readouterr().err
        if rc == 0 or words not in err:
            let_through.append((what, rc, err[-300:]))
    assert not let_through
    # and what TensorRT's builder said lands on stderr too, as trtexec prints it
    emu_build.trtexec_main(_set(lines["router"], "--useDLACore", "2"))
    assert "DLA core 2 requested; this device has 2 DLA cores" in capsys.readouterr().err


def test_dla_line_on_a_gpu_without_dla(monkeypatch, tmp_path, bundle_dir, capsys):
    emu.install(monkeypatch, gpu={**emu.ORIN_GPU, "dla_cores": 0}, trt_version=emu.TRT86)
    folder, lines = plan_lines(tmp_path, bundle_dir, "jetson-orin")
    monkeypatch.chdir(folder)
    assert emu_build.trtexec_main(lines["router"]) == 1
    assert "DLA core 0 requested; this device has 0 DLA cores" in capsys.readouterr().err
    # 8.6 reads a unitless pool size as MiB: the same line without the DLA flags builds
    fine = _set(_set(_set(lines["router"], "--useDLACore"), "--allowGPUFallback"), "--memPoolSize", "workspace:4096")
    assert emu_build.trtexec_main(fine) == 0, capsys.readouterr().err
