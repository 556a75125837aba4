"""fastsam2-profile on the session's 256-px bundle: the three report files, their numbers' shape,
and one-line errors. Nothing here asserts a speed: timings are the benchmark's business."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import THREADS

from fastsam2.runtime.contract import GRAPH_ORDER, keep_to_k
from fastsam2.runtime.profile_cli import main

KEEPS = (1.0, 0.5)
# The frame median is the median of per-iteration sums, not the sum of per-graph medians; with
# two timed iterations on a shared CPU they may differ, but not by more than this factor.
FRAME_SUM_FACTOR = 1.5


@pytest.fixture(scope="module")
def report_dir(bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "report"
    res = CliRunner().invoke(main, ["--bundle", str(bundle_dir), "--backend", "ort-cpu", "--keep", "1.0,0.5",
                                    "--warmup", "1", "--iters", "2", "--threads", str(THREADS), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote report.json, report.md, latency.png" in res.output
    return out


def test_writes_the_three_files(report_dir):
    for name in ("report.json", "report.md", "latency.png"):
        assert (report_dir / name).is_file(), name
    assert (report_dir / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_graph_timed_at_every_keep(report_dir):
    rep = json.loads((report_dir / "report.json").read_text())
    T = rep["geometry"]["tokens"]
    assert [r["keep"] for r in rep["results"]] == list(KEEPS)
    for r in rep["results"]:
        assert set(r["graphs"]) == set(GRAPH_ORDER)
        for g, s in r["graphs"].items():
            assert s["samples"] == 2
            assert s["median_ms"] > 0, g
            assert s["p90_ms"] >= s["median_ms"] >= s["min_ms"] > 0, (g, s)
        k = keep_to_k(r["keep"], T)
        assert r["k"] == k
        assert r["graphs"]["memory_attention"]["inputs"]["curr"] == [k, 256]
        assert r["graphs"]["memory_attention"]["inputs"]["curr_idx"] == [k]
        # a full bank: conditioning frame (T) + 6 tracked frames of k tokens + 16 pointers x 4
        assert r["shapes"] == {"N": k, "Ms": T + 6 * k, "M": T + 6 * k + 64}
        assert r["graphs"]["memory_attention"]["inputs"]["memory"] == [T + 6 * k + 64, 64]
        assert r["graphs"]["router"]["in_frame"] == (k < T)
        f = r["frame"]
        assert f["p90_ms"] >= f["median_ms"] >= f["min_ms"] > 0
        assert f["fps"] == pytest.approx(1000 / f["median_ms"], rel=1e-3)
        summed = sum(s["median_ms"] for s in r["graphs"].values() if s["in_frame"])
        assert summed / FRAME_SUM_FACTOR <= f["median_ms"] <= summed * FRAME_SUM_FACTOR
        assert r["memory"]["peak_rss_mb"] > 0
    mc = rep["machine"]
    assert mc["cpu_cores"] >= 1 and mc["onnxruntime"] and "CPUExecutionProvider" in mc["onnxruntime_providers"]


def test_markdown_has_a_row_per_graph_per_keep(report_dir):
    md = (report_dir / "report.md").read_text()
    for g in GRAPH_ORDER:
        assert sum(line.startswith(f"| {g} |") for line in md.splitlines()) == len(KEEPS), g
    assert sum(line.startswith("| **frame** |") for line in md.splitlines()) == len(KEEPS)


def test_library_call_matches_the_cli_shape(bundle_dir, tmp_path):
    from fastsam2.runtime.profile_report import write_report
    from fastsam2.runtime.profiling import profile_bundle

    rep = profile_bundle(bundle_dir, keeps=(0.3,), memory_frames=1, warmup=0, iters=1, threads=1)
    (r,) = rep["results"]
    T = rep["geometry"]["tokens"]
    assert r["shapes"] == {"N": keep_to_k(0.3, T), "Ms": T, "M": T + 64}
    written = write_report(rep, tmp_path / "r")
    assert [p.name for p in written] == ["report.json", "report.md", "latency.png"]


@pytest.mark.parametrize("args, needle", [
    (["--keep", "1.5"], "keep must be in (0, 1]"),
    (["--keep", "0"], "keep must be in (0, 1]"),
    (["--keep", "half"], "--keep must be comma-separated numbers"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--memory-frames", "0"], "--memory-frames must be >= 1"),
    (["--backend", "cuda-magic"], "unknown backend 'cuda-magic'"),
])
def test_bad_input_is_one_line(bundle_dir, tmp_path, args, needle):
    res = CliRunner().invoke(main, ["--bundle", str(bundle_dir), "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


def test_missing_bundle_is_one_line(tmp_path):
    res = CliRunner().invoke(main, ["--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"error: bundle folder not found: {tmp_path / 'nope'}"]


def test_profile_modules_do_not_import_torch_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys, fastsam2.runtime.profile_cli, fastsam2.runtime.profiling; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
