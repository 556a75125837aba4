"""The model repository fastsam2-serve writes: every config.pbtxt parses with Triton's own
ModelConfig schema and says what the docs say; the "graphs" layout (for servers with the
onnxruntime / tensorrt backends) is loaded by the real server here, where its only failure is
the missing onnxruntime backend."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS
from serve_helpers import SERVE_MARK, free_ports, serve_videos  # noqa: F401

pytestmark = SERVE_MARK


def test_in_process_repository(bundle_dir, tmp_path):
    from fastsam2.serve import protocol as P
    from fastsam2.serve.cli import main
    from fastsam2.serve.repository import parse_config

    repo = tmp_path / "repo"
    r = CliRunner().invoke(main, ["--bundle", str(bundle_dir), "--repo", str(repo), "--write-only",
                                  "--instances", "2", "--max-sessions", "5", "--idle-timeout", "7.5"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in repo.iterdir()) == [P.MODEL]
    c = parse_config(repo / P.MODEL / "config.pbtxt")
    assert c.backend == "python" and c.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in c.input] == [("FRAME", [-1]), ("COMMANDS", [1])]  # FRAME flat: Triton checks its bytes
    sb = c.sequence_batching
    # Triton's own timeout is a backstop (it counts queueing as idle): 5 min past the tracker's
    assert sb.max_sequence_idle_microseconds == 307_500_000
    assert sb.WhichOneof("strategy_choice") == "oldest"
    assert sb.oldest.max_candidate_sequences == 10  # 5 sessions + room for refused sequences
    assert [ci.name for ci in sb.control_input] == ["START", "END", "CORRID"]
    assert c.instance_group[0].count == 2
    params = {k: v.string_value for k, v in c.parameters.items()}
    assert params["max_sessions"] == "5" and params["graphs"] == "in_process"
    info = json.loads(params[P.INFO_PARAMETER])
    assert info["prompts"] == ["cyclist", "red ball"] and info["settings"]["image_size"] == 256
    assert (repo / P.MODEL / "1" / "model.py").read_text().count("from fastsam2.serve.tracker_model import") == 1
    assert (repo / P.MODEL / "1" / "bundle" / "manifest.json").is_file()


def test_openvino_runs_in_process_only(bundle_dir, tmp_path):
    """One vocabulary: fastsam2-serve offers every backend the runtime has, openvino included
    (the tracker opens it in its process); the graphs layout cannot run it."""
    from fastsam2.runtime.backends import BACKENDS
    from fastsam2.runtime.errors import InputError
    from fastsam2.serve import protocol as P
    from fastsam2.serve.cli import main
    from fastsam2.serve.repository import parse_config, write_repository

    help_text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    assert "|".join(BACKENDS) in help_text.replace(" ", "")
    write_repository(bundle_dir, tmp_path / "repo", backend="openvino")
    params = {k: v.string_value for k, v in parse_config(tmp_path / "repo" / P.MODEL / "config.pbtxt").parameters.items()}
    assert params["backend"] == "openvino" and params["graphs"] == "in_process"
    with pytest.raises(InputError, match="use --layout in-process"):
        write_repository(bundle_dir, tmp_path / "repo2", backend="openvino", layout="graphs")


def test_repository_refuses_a_folder_with_other_models(bundle_dir, tmp_path):
    from fastsam2.runtime.errors import OutputError
    from fastsam2.serve.repository import write_repository

    (tmp_path / "repo" / "someone_elses_model").mkdir(parents=True)
    with pytest.raises(OutputError, match="not a fastsam2 model"):
        write_repository(bundle_dir, tmp_path / "repo")


def test_graphs_layout_configs_and_real_server_load(bundle_dir, tmp_path):
    from fastsam2.serve import protocol as P
    from fastsam2.serve.repository import parse_config, write_repository
    from fastsam2.serve.server import TritonServer

    repo = tmp_path / "repo"
    write_repository(bundle_dir, repo, layout="graphs", backend="ort-cuda")
    for g in GRAPH_ORDER:
        c = parse_config(repo / g / "config.pbtxt")
        assert c.platform == "onnxruntime_onnx" and c.max_batch_size == 0
        assert c.instance_group[0].kind == c.instance_group[0].KIND_GPU
        assert [i.name for i in c.input] == GRAPHS[g].input_names
        assert [o.name for o in c.output] == GRAPHS[g].output_names
        assert (repo / g / "1" / "model.onnx").stat().st_size > 0
    ma = parse_config(repo / "memory_attention" / "config.pbtxt")
    assert list(ma.input[0].dims) == [-1, 256] and list(ma.input[2].dims) == [-1]  # N dynamic
    enc = parse_config(repo / "image_encoder" / "config.pbtxt")
    assert list(enc.input[0].dims) == [1, 3, 256, 256]
    tracker = parse_config(repo / P.MODEL / "config.pbtxt")
    params = {k: v.string_value for k, v in tracker.parameters.items()}
    assert params["graphs"] == "bls" and json.loads(params["graph_models"]) == {g: g for g in GRAPH_ORDER}

    # the real server: the tracker (python backend, BLS mode) loads; each graph fails only for
    # the onnxruntime backend this server does not have
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with pytest.raises(P.ServerError, match="failed to load all models"):
        try:
            server.start(timeout=240)
        finally:
            server.stop()
    table = {}
    for line in server.tail:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in (P.MODEL, *GRAPH_ORDER):
            table[cells[0]] = cells[2]
    assert table[P.MODEL] == "READY", table
    for g in GRAPH_ORDER:
        assert table[g].startswith("UNAVAILABLE") and "backend 'onnxruntime'" in table[g], (g, table[g])


def test_graphs_layout_tracks_through_bls(bundle_dir, serve_videos, tmp_path):
    """The graphs layout end to end, each graph served by the python stand-in for the
    onnxruntime backend (ort_graph_model.py): the tracker's BLS calls pass Triton's checks
    against every graph's config and give the local run's logits."""
    import re
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from fastsam2.runtime.session import Session
    from fastsam2.serve.client import RemoteModel
    from fastsam2.serve.repository import write_repository
    from fastsam2.serve.server import TritonServer

    repo = tmp_path / "repo"
    write_repository(bundle_dir, repo, layout="graphs", backend="ort-cpu")
    for g in GRAPH_ORDER:
        cfg = repo / g / "config.pbtxt"
        cfg.write_text(re.sub(r'platform: "onnxruntime_onnx"', 'backend: "python"', cfg.read_text()))
        shutil.copyfile(Path(__file__).with_name("ort_graph_model.py"), repo / g / "1" / "model.py")
    video = serve_videos[0]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(video.frames_dir_or_file.glob("*.jpg"))]
    points = {o: [video.first_frame_points[o]] for o in (1, 2)}
    local = Session.open(bundle_dir, backend="ort-cpu", warn=lambda m: None)
    for o, p in points.items():
        local.add_prompt(o, points=p)
    expected = [local.push(f) for f in frames]
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with server:
        s = RemoteModel(server.grpc_url).open_session()
        assert s.backend == "triton-bls"
        for o, p in points.items():
            s.add_prompt(o, points=p)
        for f, want in zip(frames, expected):
            got = s.push(f)
            assert sorted(got.objects) == sorted(want.objects) == [1, 2]
            for o in got.objects:
                # measured: max |remote - local| <= 3.2e-7 (the stand-in's ONNX Runtime session
                # options are its defaults, not the runtime's)
                np.testing.assert_allclose(got.objects[o].logits, want.objects[o].logits, rtol=0, atol=3e-6)
            assert (got.index_mask != want.index_mask).mean() < 1e-3  # a flip needs |logit| < 3e-6
        s.close()
