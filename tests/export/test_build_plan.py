"""TensorRT optimisation-profile shapes and the build plan a user runs on the device.

Nothing here needs a GPU or TensorRT: the plan is text, and the expected N/M/Ms ranges are
worked out again from the formulas (k = max(64, ceil(keep * T)); bank = 1 conditioning frame of
T tokens + 6 past frames of k tokens; + 16 object pointers of 4 tokens).
"""

import concurrent.futures
import importlib.util
import math
import os
import re
import shlex
import subprocess
import sys

import pytest

from fastsam2.export.tensorrt import build_engines, shape_profiles, write_build_plan
from fastsam2.profiles import list_targets, load_profile
from fastsam2.runtime.contract import GRAPHS, MAX_BATCH, dynamic_inputs
from fastsam2.runtime.errors import BackendError, BundleError, InputError
from fastsam2.runtime.trt_backend import TensorRTSession, check_engine_compat

GPU_TARGETS = [t for t in list_targets() if load_profile(t).tensorrt]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None

# worked by hand for keep range 0.3..1.0, export keep 0.5, num_maskmem 7, 16 pointers:
#   S=1024: T=4096, k = ceil(.3*4096)=1229, 2048, 4096
#           Ms = 4096 | 4096+6*2048 | 4096+6*4096,  M = Ms_min+4 | Ms+16*4
#   S=256:  T=256,  k = ceil(.3*256)=77, 128, 256
HAND = {
    1024: {"N": (1229, 2048, 4096), "Ms": (4096, 16384, 28672), "M": (4100, 16448, 28736)},
    256: {"N": (77, 128, 256), "Ms": (256, 1024, 1792), "M": (260, 1088, 1856)},
}


def expected_dims(image_size, keep_min, keep, keep_max, num_maskmem=7, max_obj_ptrs=16):
    t = (image_size // 16) ** 2

    def k(r):
        return min(t, max(64, math.ceil(r * t)))

    n = (k(keep_min), k(keep), k(keep_max))
    ms = (t, t + (num_maskmem - 1) * n[1], t + (num_maskmem - 1) * n[2])
    m = (ms[0] + 4, ms[1] + 4 * max_obj_ptrs, ms[2] + 4 * max_obj_ptrs)
    return {"N": n, "Ms": ms, "M": m}


def dims_of(shapes):
    ma = shapes["memory_attention"]
    return {
        "N": tuple(s[0] for s in ma["curr"]),
        "Ms": tuple(s[0] for s in ma["memory_idx"]),
        "M": tuple(s[0] for s in ma["memory"]),
    }


@pytest.mark.parametrize("target", GPU_TARGETS)
@pytest.mark.parametrize("image_size", [256, 1024])
def test_memory_attention_ranges(target, image_size):
    p = load_profile(target)
    shapes = shape_profiles(p, image_size, 0.5)
    assert dims_of(shapes) == expected_dims(image_size, p.keep_min, 0.5, p.keep_max)
    if (p.keep_min, p.keep_max) == (0.3, 1.0):
        assert dims_of(shapes) == HAND[image_size]
    ma = shapes["memory_attention"]
    # every tensor that shares a symbol shares its range
    assert ma["curr_pos"] == ma["curr"] and tuple(s[:1] for s in ma["curr_idx"]) == tuple(
        s[:1] for s in ma["curr"])
    assert ma["memory_pos"] == ma["memory"]
    assert all(s[1] == 256 for s in ma["curr"]) and all(s[1] == 64 for s in ma["memory"])


def test_every_input_of_every_graph_has_a_concrete_range():
    p = load_profile("jetson-orin")
    shapes = shape_profiles(p, 1024, 0.5)
    assert set(shapes) == set(GRAPHS)
    for g, spec in GRAPHS.items():
        assert set(shapes[g]) == set(spec.input_names)
        for name, (lo, opt, hi) in shapes[g].items():
            assert all(isinstance(d, int) for d in lo + opt + hi)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (g, name)
    assert shapes["image_encoder"]["image"][0] == (1, 3, 1024, 1024)
    # the objects' batch B: 1 at min and opt, MAX_BATCH at max
    assert shapes["router"]["prev_mask_logits"] == ((1, 1, 256, 256), (1, 1, 256, 256), (MAX_BATCH, 1, 256, 256))
    assert shapes["mask_decoder"]["point_coords"] == ((1, 1, 2), (1, 1, 2), (MAX_BATCH, p.max_points, 2))
    assert shapes["mask_decoder"]["high_res_0"][2][0] == 1  # one frame's features, broadcast


@pytest.mark.parametrize("keep", [0.2, 1.5])
def test_keep_outside_profile_range(keep):
    with pytest.raises(InputError, match="keep"):
        shape_profiles(load_profile("desktop-ada"), 1024, keep)


def parse_shapes(arg):
    out = {}
    for item in arg.split(","):
        name, dims = item.split(":")
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def plan_for(tmp_path, target, image_size=1024, keep=0.5):
    p = load_profile(target)
    shapes = shape_profiles(p, image_size, keep)
    return p, shapes, write_build_plan(tmp_path / "bundle", p, shapes)


@pytest.mark.parametrize("target", GPU_TARGETS)
@pytest.mark.parametrize("image_size", [256, 1024])
def test_build_plan_trtexec_lines(tmp_path, target, image_size):
    p, shapes, plan = plan_for(tmp_path, target, image_size)
    assert plan == tmp_path / "bundle" / "engines" / target / "build_plan.sh"
    assert os.access(plan, os.X_OK)
    subprocess.run(["bash", "-n", str(plan)], check=True)
    text = plan.read_text()
    assert "set -euo pipefail" in text and target in text and p.device in text

    lines = [ln for ln in text.splitlines() if "--saveEngine=" in ln]
    graphs = [re.search(r"--onnx=\.\./\.\./(\w+)\.onnx", ln).group(1) for ln in lines]
    assert graphs == list(GRAPHS)
    for g, line in zip(graphs, lines):
        assert f"--saveEngine={g}.engine" in line
        assert f"--memPoolSize=workspace:{p.workspace_mib}M" in line
        assert f"--builderOptimizationLevel={p.builder_optimization_level}" in line
        assert "--timingCacheFile=timing.cache" in line
        assert ("--fp16" in line) == (p.precision in ("fp16", "int8"))
        dynamic = {n for n, (lo, _, hi) in shapes[g].items() if lo != hi}
        for i, which in enumerate(("min", "opt", "max")):
            m = re.search(rf"--{which}Shapes=(\S+)", line)
            if not dynamic:
                assert m is None, (g, which)
                continue
            parsed = parse_shapes(m.group(1))
            assert parsed == {n: shapes[g][n][i] for n in dynamic}, (g, which)


def polygraphy_pairs(plan) -> list:
    """[(graph, which, reference line, check line)] of a plan's check section, which is "opt"
    or "max" (the profile's maxima, for graphs with dynamic inputs)."""
    lines = [ln.strip() for ln in plan.read_text().splitlines() if "polygraphy run" in ln]
    pairs = []
    for ref, check in zip(lines[0::2], lines[1::2]):
        g = re.search(r"\.\./\.\./(\w+)\.onnx", ref).group(1)
        pairs.append((g, "max" if f"checks/{g}.max." in ref else "opt", ref, check))
    return pairs


def test_build_plan_polygraphy_checks(tmp_path):
    _, shapes, plan = plan_for(tmp_path, "desktop-ampere")
    pairs = polygraphy_pairs(plan)
    # every graph at the opt shapes; the graphs with dynamic inputs at the profile's maxima too
    assert [(g, w) for g, w, _, _ in pairs] == [(g, w) for g in GRAPHS
                                                for w in (("opt", "max") if dynamic_inputs(g) else ("opt",))]
    for g, which, ref, check in pairs:
        ref, check = shlex.split(ref), shlex.split(check)
        saved = f"checks/{g}{'.max' if which == 'max' else ''}"
        # ONNX Runtime first, saving inputs and outputs; then the saved engine on those inputs
        assert ref[:4] == ["polygraphy", "run", f"../../{g}.onnx", "--onnxrt"]
        assert ref[ref.index("--save-inputs") + 1] == check[check.index("--load-inputs") + 1] == f"{saved}.inputs.json"
        assert ref[ref.index("--save-outputs") + 1] == check[check.index("--load-outputs") + 1] == f"{saved}.onnxrt.json"
        assert check[:6] == ["polygraphy", "run", f"{g}.engine", "--model-type", "engine", "--trt"]
        # fp16 relaxes the contract's tolerances x10
        atol = dict(w.split(":") for w in check[check.index("--atol") + 1:check.index("--rtol")])
        assert {k: float(v) for k, v in atol.items()} == pytest.approx(
            {k: 10 * v for k, v in GRAPHS[g].engine_atol.items()})
        if "--input-shapes" in ref:
            i = ref.index("--input-shapes") + 1
            given = {}
            while i < len(ref) and not ref[i].startswith("--"):
                name, dims = ref[i].split(":")
                given[name] = tuple(int(d) for d in dims.strip("[]").split(","))
                i += 1
            assert given == {n: s[1 if which == "opt" else 2] for n, s in shapes[g].items() if s[0] != s[2]}
        else:
            assert not dynamic_inputs(g)
    ma = [ref for g, _, ref, _ in pairs if g == "memory_attention"]
    assert all("'curr_idx:[0,4095]'" in r for r in ma)  # random indices stay inside the 64x64 grid
    assert "'memory:[28736,64]'" in ma[1]  # the full bank with 16 object pointers


def polygraphy_command() -> str:
    """Polygraphy's CLI on this interpreter (it has no `python -m polygraphy`): runs wherever the
    package imports, whether or not its script is next to sys.executable or on PATH."""
    code = "import sys; from polygraphy.tools import main; sys.exit(main())"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def test_build_plan_polygraphy_lines_run_against_onnxruntime(tmp_path, bundle_dir):
    """The plan's check section, run as written except that the graph under ONNX Runtime stands in
    for the engine (no GPU here): Polygraphy must accept every flag, shape, value range, saved
    file and per-output tolerance, feed the real graphs at the opt shapes and the profile's
    maxima (memory attention's: the max lines differ from the opt ones in numbers only), and
    compare. The fp16 targets' check sections are the same text (one runs here)."""
    if importlib.util.find_spec("polygraphy") is None:
        pytest.skip("polygraphy is not installed (pip install fastsam2[dev])")
    for f in bundle_dir.glob("*.onnx"):
        (tmp_path / f.name).symlink_to(f)
    checks = {}
    for target in ("jetson-orin", "desktop-ada", "hopper"):
        p = load_profile(target)
        plan = write_build_plan(tmp_path, p, shape_profiles(p, 256, 0.5))
        checks[target] = polygraphy_pairs(plan)
    assert checks["jetson-orin"] == checks["desktop-ada"] == checks["hopper"]
    pairs = checks["jetson-orin"]
    assert len(pairs) == sum(2 if dynamic_inputs(g) else 1 for g in GRAPHS)
    (plan.parent / "checks").mkdir()
    runs = [(g, which, ref, check) for g, which, ref, check in pairs if which == "opt" or g == "memory_attention"]

    def run_pair(g, which, ref, check):  # the reference line, then the check that loads its files
        engine = f" {g}.engine --model-type engine --trt "
        assert engine in check
        results = []
        for cmd in (ref, check.replace(engine, f" ../../{g}.onnx --onnxrt ")):
            cmd = cmd.replace("polygraphy", polygraphy_command(), 1)
            r = subprocess.run(["bash", "-c", cmd], cwd=plan.parent, capture_output=True, text=True, timeout=300)
            results.append(r)
            if r.returncode != 0:
                break
        return results

    # the pairs are independent (each its own files): two at a time, as many as this VM's cores
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda args: run_pair(*args), runs))
    for (g, which, _, _), results in zip(runs, done):
        assert len(results) == 2, (g, which)
        for r in results:
            out = r.stdout + r.stderr
            assert r.returncode == 0, (g, which, out[-2000:])
            # Polygraphy only warns about an unknown input name, a shape it cannot use or a
            # tolerance for a missing output, then goes on: any such warning is a broken line
            warned = [ln for ln in out.splitlines() if ln.startswith("[W]") and "'colored'" not in ln]
            assert not warned, (g, which, warned)
        tag = ".max" if which == "max" else ""
        assert (plan.parent / "checks" / f"{g}{tag}.inputs.json").is_file()
        matched = re.search(r"All outputs matched \| Outputs: \[(.*?)\]", out)
        assert matched, (g, which, out[-2000:])
        assert sorted(n.strip(" '") for n in matched.group(1).split(",")) == sorted(t.name for t in GRAPHS[g].outputs)


def test_dla_only_where_the_profile_asks(tmp_path):
    _, _, orin = plan_for(tmp_path / "a", "jetson-orin")
    _, _, ada = plan_for(tmp_path / "b", "desktop-ada")
    _, _, nano = plan_for(tmp_path / "c", "jetson-orin-nano")
    builds = lambda plan: [ln for ln in plan.read_text().splitlines() if "--saveEngine" in ln]  # noqa: E731
    assert all("--useDLACore=0 --allowGPUFallback" in ln for ln in builds(orin))
    assert not any("--useDLACore" in ln for ln in builds(ada) + builds(nano))


def test_cpu_target_has_no_build_plan(tmp_path):
    p = load_profile("cpu")
    with pytest.raises(InputError, match="ONNX Runtime"):
        write_build_plan(tmp_path, p, shape_profiles(p, 256, 0.5))


def test_engine_compat_refuses_other_gpu_or_tensorrt():
    built = {"target": "desktop-ada", "gpu_name": "NVIDIA GeForce RTX 4090",
             "compute_capability": "8.9", "tensorrt_version": "10.3.0"}
    check_engine_compat(built, current=dict(built))
    for key, other in (("gpu_name", "NVIDIA GeForce RTX 3090"), ("tensorrt_version", "10.4.0"),
                       ("gpu_name", None)):
        with pytest.raises(BundleError) as e:
            check_engine_compat(built, current={**built, key: other})
        assert "\n" not in str(e.value) and "desktop-ada" in str(e.value)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_without_tensorrt_backends_say_what_to_install(tmp_path):
    with pytest.raises(BackendError, match=r"fastsam2\[trt\]"):
        TensorRTSession(tmp_path / "mask_decoder.engine")
    p = load_profile("desktop-ada")
    with pytest.raises(BackendError, match=r"fastsam2\[trt\]"):
        build_engines(tmp_path, p, shape_profiles(p, 256, 0.5))


@pytest.mark.parametrize("module, banned", [
    ("fastsam2.runtime.trt_backend", ("torch", "tensorrt", "pycuda")),  # runtime rule
    ("fastsam2.export.tensorrt", ("tensorrt",)),  # export must work where TensorRT is absent
])
def test_imports_leave_heavy_modules_alone(module, banned):
    code = f"import sys, {module}; print(sorted(m for m in {banned!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
