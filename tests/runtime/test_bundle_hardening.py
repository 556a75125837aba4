"""A bundle is a sealed unit: the seal export writes, and hostile or damaged bundles refused
with one line before anything is allocated or any file outside the bundle is opened.

Every mutated bundle is resealed (unless the case is about the seal), so that what refuses it
is the check under test, not the seal. Bundles are clones of the session's tiny bundle whose
big files are hard links: every change replaces a file (new inode), never writes into one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fastsam2.runtime.bundle import load_bundle, read_manifest, reseal
from fastsam2.runtime.bundle_files import describe_graph_error, seal_digest, sealed_names
from fastsam2.runtime.contract import GRAPH_ORDER
from fastsam2.runtime.errors import BundleError
from fastsam2.runtime.manifest_schema import validate_manifest

HERE = Path(__file__).resolve().parent


def clone(src: Path, dst: Path) -> Path:
    for p in sorted(src.rglob("*")):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        if p.name == "manifest.json":
            shutil.copyfile(p, q)
        else:
            try:
                os.link(p, q)
            except OSError:
                shutil.copyfile(p, q)
    return dst


def manifest_of(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def write_manifest(b: Path, m: dict, seal: bool = True) -> None:
    """m as manifest.json; with seal, sealed as export would (file hashes from m's own seal)."""
    if seal:
        m["seal"]["sha256"] = seal_digest(m, m["seal"]["files"])
    (b / "manifest.json").unlink()
    (b / "manifest.json").write_text(json.dumps(m))


def put(b: Path, m: dict, rel: str, data: bytes) -> None:
    """Replace a bundle file (a new inode: the clone's files are links to the session bundle)
    and record its hash where the manifest and the seal name it."""
    f = b / rel
    if f.exists() or f.is_symlink():
        f.unlink()
    f.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    m["seal"]["files"][rel] = digest
    for entry in [m["constants"], m["text"], *m["graphs"].values()]:
        if entry["file"] == rel:
            entry["sha256"] = digest


def npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def constants_of(b: Path) -> dict:
    with np.load(b / "constants.npz") as z:
        return {k: z[k] for k in z.files}


def bomb_npz(good: dict) -> bytes:
    """vision_pos's header declares 2**40 floats; the member holds a few bytes."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in good.items():
            member = io.BytesIO()
            if k == "vision_pos":
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "<f4", "fortran_order": False, "shape": (1 << 20, 1 << 20)})
                member.write(b"\0" * 64)
            else:
                np.lib.format.write_array(member, v)
            z.writestr(f"{k}.npy", member.getvalue())
    return buf.getvalue()


def external_data_onnx(outside: Path) -> bytes:
    """A tiny valid graph whose weight lives in a file outside the bundle."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", str(outside / "weights.bin")), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [t])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def nested(n: int):
    v = 0
    for _ in range(n):
        v = [v]
    return v


def _set(path: str, value):
    def edit(m, b, out):
        *head, last = path.split(".")
        d = m
        for k in head:
            d = d[k]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value(out) if callable(value) else value
    return edit


_DELETE = object()
SHA = "0" * 64


def _engines(info):
    return _set("engines", info)


def _raw(fn):
    """A case that writes manifest.json's bytes itself (no reseal)."""
    fn.raw = True
    return fn


def _unsealed(fn):
    fn.unsealed = True
    return fn


def _symlink_graph(m, b, out):
    (b / "router.onnx").unlink()
    (b / "router.onnx").symlink_to(out / "router.onnx")  # same bytes: the hash matches


@_raw
def _symlink_manifest(m, b, out):
    (out / "manifest.json").write_text(json.dumps(m))
    (b / "manifest.json").unlink()
    (b / "manifest.json").symlink_to(out / "manifest.json")


def _symlink_engines(m, b, out):
    (out / "engines").mkdir(exist_ok=True)
    (b / "engines").symlink_to(out / "engines")


def _device_engines(m, b, out, record=None, link=None):
    m["engines"] = {"target": "jetson-orin", "keep_range": [0.3, 1.0], "built": False}
    d = b / "engines" / "jetson-orin"
    d.mkdir(parents=True)
    if record is not None:
        (d / "engines.json").write_text(json.dumps(record))
    if link is not None:
        (d / link).symlink_to(out / "router.onnx")


def _const(edit):
    def case(m, b, out):
        c = constants_of(b)
        edit(c)
        put(b, m, "constants.npz", npz_bytes(**c))
    return case


def _file(rel, data):
    def case(m, b, out):
        put(b, m, rel, data(b, out) if callable(data) else data)
    return case


def _graph_dir(m, b, out):
    (b / "router.onnx").unlink()
    (b / "router.onnx").mkdir()


def _unsealed_graph(m, b, out):
    shutil.copyfile(b / "router.onnx", b / "router2.onnx")
    m["graphs"]["router"]["file"] = "router2.onnx"


def _raw_text(text):
    def case(m, b, out):
        raw = text(json.dumps(m)) if callable(text) else text
        (b / "manifest.json").unlink()
        (b / "manifest.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    case.raw = True
    return case


# (name, mutation, words the one-line error must hold)
CASES = [
    ("image_size string", _set("image_size", "256"), "image_size must be an integer"),
    ("image_size null", _set("image_size", None), "image_size must be an integer"),
    ("image_size bool", _set("image_size", True), "image_size must be an integer"),
    ("image_size negative", _set("image_size", -256), "image_size must be an integer in 64..2048"),
    ("image_size huge", _set("image_size", 10 ** 12), "image_size must be an integer in 64..2048"),
    ("image_size float", _set("image_size", 1e300), "image_size must be an integer"),
    ("image_size missing", _set("image_size", _DELETE), "image_size is missing"),
    ("image_size not /16", lambda m, b, o: (m.update(image_size=264), m["model"].update(image_size=264)),
     "multiple of 16"),
    ("geometry other than the graphs'", lambda m, b, o: (m.update(image_size=512, token_grid=[32, 32]),
                                                       m["model"].update(image_size=512)),
     "do not match the graph contract"),
    ("token grid absurd", _set("token_grid", [100000, 100000]), "token_grid[0] must be an integer"),
    ("token grid other", _set("token_grid", [17, 17]), "token_grid must be [16, 16]"),
    ("num_maskmem huge", _set("model.num_maskmem", 10 ** 9), "model.num_maskmem must be an integer in 1..64"),
    ("num_maskmem negative", _set("model.num_maskmem", -1), "model.num_maskmem"),
    ("max_obj_ptrs huge", _set("model.max_obj_ptrs_in_encoder", 10 ** 7), "model.max_obj_ptrs_in_encoder"),
    ("hidden_dim", _set("model.hidden_dim", 4096), "model.hidden_dim must be one of 256"),
    ("mem_dim", _set("model.mem_dim", -64), "model.mem_dim"),
    ("text_dim huge", _set("model.text_dim", 10 ** 9), "model.text_dim"),
    ("stride zero", _set("model.memory_temporal_stride_for_eval", 0), "memory_temporal_stride_for_eval"),
    ("image_std zero", _set("model.image_std", [0, 0, 0]), "model.image_std[0] must be a number"),
    ("image_mean short", _set("model.image_mean", [0.5]), "model.image_mean must hold 3..3 items"),
    ("image_mean strings", _set("model.image_mean", ["a", "b", "c"]), "model.image_mean[0]"),
    ("model key missing", _set("model.pred_obj_scores", _DELETE), "model.pred_obj_scores is missing"),
    ("model flag a string", _set("model.pred_obj_scores", "yes"), "model.pred_obj_scores must be true or false"),
    ("model null", _set("model", None), "model must be an object"),
    ("keep out of range", _set("keep", 2.5), "keep must be a keep ratio"),
    ("keep_floor negative", _set("keep_floor", -5), "keep_floor"),
    ("k huge", _set("k", 10 ** 9), "k must be an integer"),
    ("graph missing", _set("graphs.router", _DELETE), "lacks graphs: router"),
    ("graphs a list", _set("graphs", []), "graphs must be an object"),
    ("graph file absolute", _set("graphs.router.file", lambda o: str(o / "router.onnx")), "relative path"),
    ("graph file ..", _set("graphs.router.file", "../outside/router.onnx"), "relative path inside the bundle"),
    ("graph file engines/../..", _set("graphs.router.file", "engines/../../outside/router.onnx"), "relative path"),
    ("graph file null", _set("graphs.router.file", None), "graphs.router.file must be a relative path"),
    ("graph file int", _set("graphs.router.file", 5), "graphs.router.file must be a relative path"),
    ("graph file newline", _set("graphs.router.file", "router\n.onnx"), "graphs.router.file"),
    ("graph sha256 bad", _set("graphs.router.sha256", "abc"), "graphs.router.sha256 must be a sha256"),
    ("ort variant outside", _set("graphs.memory_attention.ort_variant.file", "../outside/router.onnx"),
     "ort_variant.file must be a relative path"),
    ("precision variant outside", _set("graphs.router.variants", lambda o: {"int8": {"file": str(o / "router.onnx"),
                                                                                   "sha256": SHA}}),
     "variants.int8.file must be a relative path"),
    ("graph input absurd", _set("graphs.memory_attention.inputs", [{"name": "curr", "dtype": "float32",
                                                                    "shape": [10 ** 9, 256]}]), "must be"),
    ("graph input other shape", _set("graphs.router.inputs", [{"name": "feat", "dtype": "float32",
                                                               "shape": [1, 256, 4096, 4096]}]),
     "graphs.router.inputs do not match the graph contract"),
    ("constants outside", _set("constants.file", "../outside/constants.npz"), "constants.file"),
    ("text outside", _set("text.file", lambda o: str(o / "text_embeddings.npz")), "text.file"),
    ("engines target ..", _engines({"target": "../../outside", "built": False}), "engines.target must be a name"),
    ("engine files outside", _engines({"target": "hopper", "built": True,
                                       "graphs": {g: {"file": "../outside/router.onnx"} for g in GRAPH_ORDER}}),
     "engines.graphs.image_encoder.file"),
    ("build plan outside", _engines({"target": "hopper", "build_plan": "/tmp/evil.sh"}), "engines.build_plan"),
    ("profile shapes absurd", _engines({"target": "hopper", "profile_shapes": {"memory_attention": {
        "curr": [[1, 256], [1, 256], [10 ** 9, 256]]}}}), "engines.profile_shapes"),
    ("profile shapes wrong rank", _engines({"target": "hopper", "profile_shapes": {"memory_attention": {
        "curr": [[1], [1], [4]]}}}), "does not fit the graph's inputs"),
    ("keep range reversed", _engines({"keep_range": [0.9, 0.3]}), "engines.keep_range"),
    ("engines a string", _engines("all"), "engines must be an object"),
    ("prompts not strings", _set("prompts", [1, 2]), "prompts[0] must be a string"),
    ("deep nesting", _set("notes", nested(40)), "nests deeper than 16"),
    ("version of another type", _set("fastsam2_version", 5), "exported by fastsam2 5"),
    ("seal removed", _unsealed(_set("seal", _DELETE)), "has no seal"),
    ("normalisation edited, not resealed", _unsealed(_set("model.image_std", [0.5, 0.5, 0.5])),
     "changed since export"),
    ("memory settings edited, not resealed", _unsealed(_set("model.num_maskmem", 3)), "changed since export"),
    ("seal names a file outside", lambda m, b, o: m["seal"]["files"].update({"../outside/router.onnx": SHA}),
     "points outside the bundle"),
    ("graph not sealed", _unsealed_graph, "is not sealed"),
    ("graph symlinked out", _symlink_graph, "points outside the bundle"),
    ("manifest symlinked out", _symlink_manifest, "points outside the bundle"),
    ("engines folder symlinked out", _symlink_engines, "points outside the bundle"),
    ("engine symlinked out", lambda m, b, o: _device_engines(m, b, o, link="router.engine"),
     "points outside the bundle"),
    ("calibration cache symlinked out", lambda m, b, o: _device_engines(m, b, o, link="calibration_router.cache"),
     "points outside the bundle"),
    ("engines.json names a file outside", lambda m, b, o: _device_engines(m, b, o, record={
        "target": "jetson-orin", "built": True, "graphs": {g: {"file": str(o / "x.engine")} for g in GRAPH_ORDER}}),
     "engines.graphs.image_encoder.file"),
    ("engines.json says more", lambda m, b, o: _device_engines(m, b, o, record={"build_plan": "/tmp/x.sh"}),
     "record_engines never writes"),
    ("engines.json other target", lambda m, b, o: _device_engines(m, b, o, record={"target": "hopper"}),
     "is for target 'hopper'"),
    ("engines.json not json", lambda m, b, o: _device_engines(m, b, o, record="x") or
     (b / "engines/jetson-orin/engines.json").write_text("{nope"), "is not valid JSON"),
    ("constants wrong shape", _const(lambda c: c.update(vision_pos=c["vision_pos"][:10])), "'vision_pos' is float32 (10, 256)"),
    ("constants wrong dtype", _const(lambda c: c.update(no_mem_embed=c["no_mem_embed"].astype(np.float64))),
     "'no_mem_embed' is float64"),
    ("constants key missing", _const(lambda c: c.pop("no_obj_ptr")), "lack 'no_obj_ptr'"),
    ("constants key extra", _const(lambda c: c.update(evil=np.zeros(3, np.float32))), "unexpected array 'evil'"),
    ("constants object array", _const(lambda c: c.update(no_obj_ptr=np.array([{"a": 1}], dtype=object))),
     "holds Python objects"),
    ("constants non-finite", _const(lambda c: c["vision_pos"].__setitem__((0, 0), np.nan)), "non-finite"),
    ("constants header bomb", _file("constants.npz", lambda b, o: bomb_npz(constants_of(b))),
     "shorter than its header says"),
    ("constants not a zip", _file("constants.npz", b"PK\x03\x04 not really"), "cannot read"),
    ("text embeddings other width", _file("text_embeddings.npz", lambda b, o: npz_bytes(
        prompts=np.array(["cyclist", "red ball"]), embeddings=np.ones((2, 100), np.float32))),
     "'embeddings' is float32 (2, 100)"),
    ("text embeddings other prompts", _file("text_embeddings.npz", lambda b, o: npz_bytes(
        prompts=np.array(["a", "b"]), embeddings=np.ones((2, 512), np.float32))), "other prompts"),
    ("graph garbage", _file("router.onnx", b"this is not a protobuf at all"), "not a valid ONNX model"),
    ("graph truncated", _file("router.onnx", lambda b, o: (b / "router.onnx").read_bytes()[:5000]),
     "not a valid ONNX model"),
    ("graph with external data", _file("router.onnx", lambda b, o: external_data_onnx(o)), "external file"),
    ("graph is a folder", _graph_dir, "is not a regular file"),
    ("raw: NaN", _raw_text(lambda t: t.replace('"keep": 1.0', '"keep": NaN')), "not valid JSON"),
    ("raw: 1e999", _raw_text(lambda t: t.replace('"keep": 1.0', '"keep": 1e999')), "not valid JSON"),
    ("raw: 5000-digit int", _raw_text(lambda t: t.replace('"image_size": 256', '"image_size": 1' + "0" * 5000)),
     "not valid JSON"),
    ("raw: nesting past the parser", _raw_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"), "nests deeper"),
    ("raw: oversized", _raw_text(lambda t: t[:-1] + ', "pad": "' + "x" * (2 << 20) + '"}'), "larger than"),
    ("raw: not an object", _raw_text("[]"), "must hold a JSON object"),
    ("raw: not utf-8", _raw_text(b"\xff\xfe{\x00}"), "not UTF-8"),
    ("raw: truncated", _raw_text(lambda t: t[: len(t) // 2]), "not valid JSON"),
]


def make_case(bundle_dir: Path, root: Path, outside: Path, i: int) -> tuple:
    name, mutate, words = CASES[i]
    b = clone(bundle_dir, root / f"b{i:03d}")
    m = manifest_of(b)
    mutate(m, b, outside)
    if not getattr(mutate, "raw", False):
        write_manifest(b, m, seal=not getattr(mutate, "unsealed", False))
    return b, words


@pytest.fixture(scope="module")
def outside(tmp_path_factory, bundle_dir):
    """Files outside every bundle that the cases point at: valid copies of bundle files, so
    that only the path checks stand between them and the runtime."""
    out = tmp_path_factory.mktemp("outside")
    for name in ("router.onnx", "constants.npz", "text_embeddings.npz", "manifest.json"):
        shutil.copyfile(bundle_dir / name, out / name)
    (out / "x.engine").write_bytes(b"engine")
    (out / "weights.bin").write_bytes(b"\0" * 16)
    return out


def test_export_seals_the_bundle(bundle_dir):
    m = manifest_of(bundle_dir)
    seal = m["seal"]
    assert sorted(seal["files"]) == sealed_names(bundle_dir)
    assert {"router.onnx", "constants.npz", "text_embeddings.npz"} <= set(seal["files"])
    assert "manifest.json" not in seal["files"]
    assert seal["sha256"] == seal_digest(m, seal["files"])
    validate_manifest(m)
    assert load_bundle(bundle_dir).manifest == m


def test_reseal_after_a_deliberate_edit(bundle_dir, tmp_path):
    b = clone(bundle_dir, tmp_path / "b")
    m = manifest_of(b)
    m["model"]["image_std"] = [0.25, 0.25, 0.25]
    write_manifest(b, m, seal=False)
    with pytest.raises(BundleError, match="changed since export"):
        read_manifest(b)
    reseal(b)
    assert load_bundle(b).settings["image_std"] == [0.25, 0.25, 0.25]
    # re-indenting is not an edit: the seal is over the manifest's content
    (b / "manifest.json").write_text(json.dumps(manifest_of(b), indent=7))
    load_bundle(b)


def test_device_files_stay_outside_the_seal(bundle_dir, tmp_path):
    """engines/<target>/ is written on the device after export; the seal does not cover it."""
    b = clone(bundle_dir, tmp_path / "b")
    m = manifest_of(b)
    m["engines"] = {"target": "jetson-orin", "keep_range": [0.3, 1.0], "built": False}
    write_manifest(b, m)
    d = b / "engines" / "jetson-orin"
    d.mkdir(parents=True)
    for f in ("router.engine", "timing.cache", "calibration_router.cache"):
        (d / f).write_bytes(b"built on the device")
    (d / "engines.json").write_text(json.dumps({"target": "jetson-orin", "built": True, "gpu_name": "Orin",
                                                "graphs": {g: {"file": f"engines/jetson-orin/{g}.engine",
                                                               "sha256": SHA} for g in GRAPH_ORDER}}))
    bundle = load_bundle(b)
    assert bundle.engines["built"] is True and bundle.engines["gpu_name"] == "Orin"
    assert bundle.engine_file("router") == b / "engines" / "jetson-orin" / "router.engine"
    assert bundle.calibration_cache("router") == d / "calibration_router.cache"


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_hostile_manifest_is_one_line(bundle_dir, outside, tmp_path, i):
    b, words = make_case(bundle_dir, tmp_path, outside, i)
    with pytest.raises(BundleError) as e:
        load_bundle(b)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and len(msg) < 600, msg


DRIVER = textwrap.dedent("""
    import json, os, sys
    outside = os.path.realpath(sys.argv[1])
    opened = []
    def audit(event, args):
        # realpath: a link inside a bundle that leads outside counts as outside
        if event == "open" and isinstance(args[0], str) and os.path.realpath(args[0]).startswith(outside):
            opened.append(args[0])
    sys.addaudithook(audit)
    from click.testing import CliRunner
    from fastsam2.runtime.run_cli import main
    for line in sys.stdin:
        case = json.loads(line)
        r = CliRunner().invoke(main, case["args"])
        print(json.dumps({"i": case["i"], "code": r.exit_code, "out": r.output,
                          "exc": repr(r.exception) if r.exit_code not in (0, 2) else None}), flush=True)
    print(json.dumps({"opened": opened}), flush=True)
""")


def test_fastsam2_run_refuses_every_case_in_one_line_and_reads_nothing_outside(bundle_dir, outside, tmp_path):
    """All cases through fastsam2-run in one process, under strace when it can run: exit 2, one
    `error:` line, no output folder, and no open() of any file outside the bundles."""
    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (64, 48), (i * 50, 90, 120)).save(frames / f"{i:05d}.jpg")
    cases = []
    for i in range(len(CASES)):
        b, _ = make_case(bundle_dir, tmp_path / "cases", outside, i)
        cases.append({"i": i, "args": [str(frames), "--bundle", str(b), "--prompt", "cyclist", "--backend",
                                       "ort-cpu", "--out", str(tmp_path / "out" / str(i)), "--quiet"]})
    cmd = [sys.executable, "-c", DRIVER, str(outside)]
    trace = tmp_path / "strace.log"
    traced = False
    if shutil.which("strace"):  # ptrace may be forbidden (some containers): the audit hook remains
        probe = subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True)
        if probe.returncode == 0:
            # -y: each returned descriptor with the file it really opened (links followed)
            cmd = ["strace", "-f", "-qq", "-y", "-e", "trace=open,openat,openat2,creat", "-o", str(trace)] + cmd
            traced = True
    r = subprocess.run(cmd, input="".join(json.dumps(c) + "\n" for c in cases), capture_output=True,
                       text=True, timeout=300, cwd=HERE.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    results, opened = lines[:-1], lines[-1]["opened"]
    assert [x["i"] for x in results] == list(range(len(CASES)))
    assert opened == []  # Python-level opens (np.load, open, zipfile) of anything outside
    if traced:  # every open, ONNX Runtime's C++ ones included
        text = trace.read_text()
        assert "openat" in text or "open(" in text  # the trace did record opens
        assert [ln for ln in text.splitlines() if str(outside) in ln] == []
    for x in results:
        name, _, words = CASES[x["i"]]
        out = x["out"].strip()
        assert x["code"] == 2, (name, x)
        assert len(out.splitlines()) == 1 and out.startswith("error: ") and words in out, (name, out)
        assert "Traceback" not in out, name
        assert not (tmp_path / "out" / str(x["i"])).exists(), name


def test_onnxruntime_refusal_becomes_one_bundle_line(tmp_path):
    import onnxruntime as ort

    bad = tmp_path / "router.onnx"
    bad.write_bytes(b"\x08\x07" + b"\xff" * 64)
    with pytest.raises(Exception) as e:
        ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])
    err = describe_graph_error(bad, e.value)
    assert isinstance(err, BundleError) and "\n" not in str(err)
    assert str(err).startswith(f"ONNX Runtime cannot load graph {bad}") and "/onnxruntime_src" not in str(err)
