"""Hostile manifests refused with one line before anything is allocated or any file outside the
bundle is opened: every field the runtime reads is checked (runtime/manifest_schema.py), through
load_bundle and through fastsam2-run. The seal itself: test_bundle_hardening_seal.py.

Every mutated bundle is resealed (unless the case is about the seal), so that what refuses it
is the check under test, not the seal (tests/runtime/hostile_bundles.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hostile_bundles import (DELETE, SHA, bomb_npz, constants_of, device_engines, edit_constants,
                             engines_section, external_data_onnx, graph_is_folder, make_case, nested,
                             not_resealed, npz_bytes, outside_files, raw_manifest, replace_file, set_key,
                             symlink_engines, symlink_graph, symlink_manifest, unsealed_graph)

from fastsam2.runtime.bundle import load_bundle
from fastsam2.runtime.contract import GRAPH_ORDER
from fastsam2.runtime.errors import BundleError

HERE = Path(__file__).resolve().parent

# (name, mutation, words the one-line error must hold)
CASES = [
    ("image_size string", set_key("image_size", "256"), "image_size must be an integer"),
    ("image_size null", set_key("image_size", None), "image_size must be an integer"),
    ("image_size bool", set_key("image_size", True), "image_size must be an integer"),
    ("image_size negative", set_key("image_size", -256), "image_size must be an integer in 64..2048"),
    ("image_size huge", set_key("image_size", 10 ** 12), "image_size must be an integer in 64..2048"),
    ("image_size float", set_key("image_size", 1e300), "image_size must be an integer"),
    ("image_size missing", set_key("image_size", DELETE), "image_size is missing"),
    ("image_size not /16", lambda m, b, o: (m.update(image_size=264), m["model"].update(image_size=264)),
     "multiple of 16"),
    ("geometry other than the graphs'", lambda m, b, o: (m.update(image_size=512, token_grid=[32, 32]),
                                                       m["model"].update(image_size=512)),
     "do not match the graph contract"),
    ("token grid absurd", set_key("token_grid", [100000, 100000]), "token_grid[0] must be an integer"),
    ("token grid other", set_key("token_grid", [17, 17]), "token_grid must be [16, 16]"),
    ("num_maskmem huge", set_key("model.num_maskmem", 10 ** 9), "model.num_maskmem must be an integer in 1..64"),
    ("num_maskmem negative", set_key("model.num_maskmem", -1), "model.num_maskmem"),
    ("max_obj_ptrs huge", set_key("model.max_obj_ptrs_in_encoder", 10 ** 7), "model.max_obj_ptrs_in_encoder"),
    ("hidden_dim", set_key("model.hidden_dim", 4096), "model.hidden_dim must be one of 256"),
    ("mem_dim", set_key("model.mem_dim", -64), "model.mem_dim"),
    ("text_dim huge", set_key("model.text_dim", 10 ** 9), "model.text_dim"),
    ("stride zero", set_key("model.memory_temporal_stride_for_eval", 0), "memory_temporal_stride_for_eval"),
    ("image_std zero", set_key("model.image_std", [0, 0, 0]), "model.image_std[0] must be a number"),
    ("image_mean short", set_key("model.image_mean", [0.5]), "model.image_mean must hold 3..3 items"),
    ("image_mean strings", set_key("model.image_mean", ["a", "b", "c"]), "model.image_mean[0]"),
    ("model key missing", set_key("model.pred_obj_scores", DELETE), "model.pred_obj_scores is missing"),
    ("model flag a string", set_key("model.pred_obj_scores", "yes"), "model.pred_obj_scores must be true or false"),
    ("model null", set_key("model", None), "model must be an object"),
    ("keep out of range", set_key("keep", 2.5), "keep must be a keep ratio"),
    ("keep_floor negative", set_key("keep_floor", -5), "keep_floor"),
    ("k huge", set_key("k", 10 ** 9), "k must be an integer"),
    ("graph missing", set_key("graphs.router", DELETE), "lacks graphs: router"),
    ("graphs a list", set_key("graphs", []), "graphs must be an object"),
    ("graph file absolute", set_key("graphs.router.file", lambda o: str(o / "router.onnx")), "relative path"),
    ("graph file ..", set_key("graphs.router.file", "../outside/router.onnx"), "relative path inside the bundle"),
    ("graph file engines/../..", set_key("graphs.router.file", "engines/../../outside/router.onnx"), "relative path"),
    ("graph file null", set_key("graphs.router.file", None), "graphs.router.file must be a relative path"),
    ("graph file int", set_key("graphs.router.file", 5), "graphs.router.file must be a relative path"),
    ("graph file newline", set_key("graphs.router.file", "router\n.onnx"), "graphs.router.file"),
    ("graph sha256 bad", set_key("graphs.router.sha256", "abc"), "graphs.router.sha256 must be a sha256"),
    ("ort variant outside", set_key("graphs.memory_attention.ort_variant.file", "../outside/router.onnx"),
     "ort_variant.file must be a relative path"),
    ("precision variant outside", set_key("graphs.router.variants", lambda o: {"int8": {"file": str(o / "router.onnx"),
                                                                                   "sha256": SHA}}),
     "variants.int8.file must be a relative path"),
    ("graph input absurd", set_key("graphs.memory_attention.inputs", [{"name": "curr", "dtype": "float32",
                                                                    "shape": [10 ** 9, 256]}]), "must be"),
    ("graph input other shape", set_key("graphs.router.inputs", [{"name": "feat", "dtype": "float32",
                                                               "shape": [1, 256, 4096, 4096]}]),
     "graphs.router.inputs do not match the graph contract"),
    ("constants outside", set_key("constants.file", "../outside/constants.npz"), "constants.file"),
    ("text outside", set_key("text.file", lambda o: str(o / "text_embeddings.npz")), "text.file"),
    ("engines target ..", engines_section({"target": "../../outside", "built": False}), "engines.target must be a name"),
    ("engine files outside", engines_section({"target": "hopper", "built": True,
                                       "graphs": {g: {"file": "../outside/router.onnx"} for g in GRAPH_ORDER}}),
     "engines.graphs.image_encoder.file"),
    ("build plan outside", engines_section({"target": "hopper", "build_plan": "/tmp/evil.sh"}), "engines.build_plan"),
    ("profile shapes absurd", engines_section({"target": "hopper", "profile_shapes": {"memory_attention": {
        "curr": [[1, 256], [1, 256], [10 ** 9, 256]]}}}), "engines.profile_shapes"),
    ("profile shapes wrong rank", engines_section({"target": "hopper", "profile_shapes": {"memory_attention": {
        "curr": [[1], [1], [4]]}}}), "does not fit the graph's inputs"),
    ("keep range reversed", engines_section({"keep_range": [0.9, 0.3]}), "engines.keep_range"),
    ("engines a string", engines_section("all"), "engines must be an object"),
    ("prompts not strings", set_key("prompts", [1, 2]), "prompts[0] must be a string"),
    ("deep nesting", set_key("notes", nested(40)), "nests deeper than 16"),
    ("version of another type", set_key("fastsam2_version", 5), "exported by fastsam2 5"),
    ("seal removed", not_resealed(set_key("seal", DELETE)), "has no seal"),
    ("normalisation edited, not resealed", not_resealed(set_key("model.image_std", [0.5, 0.5, 0.5])),
     "changed since export"),
    ("memory settings edited, not resealed", not_resealed(set_key("model.num_maskmem", 3)), "changed since export"),
    ("seal names a file outside", lambda m, b, o: m["seal"]["files"].update({"../outside/router.onnx": SHA}),
     "points outside the bundle"),
    ("graph not sealed", unsealed_graph, "is not sealed"),
    ("graph symlinked out", symlink_graph, "points outside the bundle"),
    ("manifest symlinked out", symlink_manifest, "points outside the bundle"),
    ("engines folder symlinked out", symlink_engines, "points outside the bundle"),
    ("engine symlinked out", lambda m, b, o: device_engines(m, b, o, link="router.engine"),
     "points outside the bundle"),
    ("calibration cache symlinked out", lambda m, b, o: device_engines(m, b, o, link="calibration_router.cache"),
     "points outside the bundle"),
    ("engines.json names a file outside", lambda m, b, o: device_engines(m, b, o, record={
        "target": "jetson-orin", "built": True, "graphs": {g: {"file": str(o / "x.engine")} for g in GRAPH_ORDER}}),
     "engines.graphs.image_encoder.file"),
    ("engines.json says more", lambda m, b, o: device_engines(m, b, o, record={"build_plan": "/tmp/x.sh"}),
     "record_engines never writes"),
    ("engines.json other target", lambda m, b, o: device_engines(m, b, o, record={"target": "hopper"}),
     "is for target 'hopper'"),
    ("engines.json not json", lambda m, b, o: device_engines(m, b, o, record="x") or
     (b / "engines/jetson-orin/engines.json").write_text("{nope"), "is not valid JSON"),
    ("constants wrong shape", edit_constants(lambda c: c.update(vision_pos=c["vision_pos"][:10])), "'vision_pos' is float32 (10, 256)"),
    ("constants wrong dtype", edit_constants(lambda c: c.update(no_mem_embed=c["no_mem_embed"].astype(np.float64))),
     "'no_mem_embed' is float64"),
    ("constants key missing", edit_constants(lambda c: c.pop("no_obj_ptr")), "lack 'no_obj_ptr'"),
    ("constants key extra", edit_constants(lambda c: c.update(evil=np.zeros(3, np.float32))), "unexpected array 'evil'"),
    ("constants object array", edit_constants(lambda c: c.update(no_obj_ptr=np.array([{"a": 1}], dtype=object))),
     "holds Python objects"),
    ("constants non-finite", edit_constants(lambda c: c["vision_pos"].__setitem__((0, 0), np.nan)), "non-finite"),
    ("constants header bomb", replace_file("constants.npz", lambda b, o: bomb_npz(constants_of(b))),
     "shorter than its header says"),
    ("constants not a zip", replace_file("constants.npz", b"PK\x03\x04 not really"), "cannot read"),
    ("text embeddings other width", replace_file("text_embeddings.npz", lambda b, o: npz_bytes(
        prompts=np.array(["cyclist", "red ball"]), embeddings=np.ones((2, 100), np.float32))),
     "'embeddings' is float32 (2, 100)"),
    ("text embeddings other prompts", replace_file("text_embeddings.npz", lambda b, o: npz_bytes(
        prompts=np.array(["a", "b"]), embeddings=np.ones((2, 512), np.float32))), "other prompts"),
    ("graph garbage", replace_file("router.onnx", b"this is not a protobuf at all"), "not a valid ONNX model"),
    ("graph truncated", replace_file("router.onnx", lambda b, o: (b / "router.onnx").read_bytes()[:5000]),
     "not a valid ONNX model"),
    ("graph with external data", replace_file("router.onnx", lambda b, o: external_data_onnx(o)), "external file"),
    ("graph is a folder", graph_is_folder, "is not a regular file"),
    ("raw: NaN", raw_manifest(lambda t: t.replace('"keep": 1.0', '"keep": NaN')), "not valid JSON"),
    ("raw: 1e999", raw_manifest(lambda t: t.replace('"keep": 1.0', '"keep": 1e999')), "not valid JSON"),
    ("raw: 5000-digit int", raw_manifest(lambda t: t.replace('"image_size": 256', '"image_size": 1' + "0" * 5000)),
     "not valid JSON"),
    ("raw: nesting past the parser", raw_manifest('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"), "nests deeper"),
    ("raw: oversized", raw_manifest(lambda t: t[:-1] + ', "pad": "' + "x" * (2 << 20) + '"}'), "larger than"),
    ("raw: not an object", raw_manifest("[]"), "must hold a JSON object"),
    ("raw: not utf-8", raw_manifest(b"\xff\xfe{\x00}"), "not UTF-8"),
    ("raw: truncated", raw_manifest(lambda t: t[: len(t) // 2]), "not valid JSON"),
    ("openvino a string", set_key("openvino", "yes"), "openvino must be an object"),
    ("openvino a list", set_key("openvino", ["CPU"]), "openvino must be an object"),
    ("openvino device a number", set_key("openvino", {"device": 5}), "openvino.device must be one of CPU, GPU"),
    ("openvino device unknown", set_key("openvino", {"device": "TPU"}), "openvino.device must be one of"),
    ("openvino device 100k characters", set_key("openvino", {"device": "CPU" * 33_334}), "openvino.device"),
    ("openvino precision a dict", set_key("openvino", {"device": "CPU", "precision": {"fp32": 1}}),
     "openvino.precision must be one of 'fp32'"),
    ("openvino preferred a string", set_key("openvino", {"preferred": "yes"}), "openvino.preferred must be true"),
    ("openvino unknown key", set_key("openvino", {"device": "CPU", "cache": "/tmp"}), "unexpected key 'cache'"),
    ("correct-as-cond a string", set_key("model.add_all_frames_to_correct_as_cond", "no"),
     "model.add_all_frames_to_correct_as_cond must be true or false"),
    ("variant format a dict", set_key("graphs.router.variants", {"int8": {
        "file": "router.onnx", "sha256": SHA, "format": {"a": 1}}}), "variants.int8.format must be a name"),
]


@pytest.fixture(scope="module")
def outside(tmp_path_factory, bundle_dir):
    return outside_files(tmp_path_factory.mktemp("outside"), bundle_dir)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_hostile_manifest_is_one_line(bundle_dir, outside, tmp_path, i):
    b, words = make_case(CASES, bundle_dir, tmp_path, outside, i)
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
        b, _ = make_case(CASES, bundle_dir, tmp_path / "cases", outside, i)
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


@pytest.mark.parametrize("section", [{"device": "CPU", "precision": "fp32", "preferred": False},
                                     {"device": "npu", "precision": "fp16", "preferred": True}, {}])
def test_openvino_sections_export_writes_are_accepted(bundle_dir, section):
    from fastsam2.runtime.manifest_schema import validate_manifest

    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["openvino"] = section
    m["model"]["add_all_frames_to_correct_as_cond"] = False
    validate_manifest(m)
