"""fastsam2-profile on the session's 256-px bundle: the three report files, their numbers' shape,
and one-line errors. Nothing here asserts a speed: timings are the benchmark's business."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import THREADS

from fastsam2.runtime.contract import GRAPH_ORDER, keep_to_k
from fastsam2.runtime.profile_cli import main
from fastsam2.runtime.run_folder import RECORD_NAME

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
    (["--keep", "auto"], "--keep must be comma-separated numbers"),
    (["--keep", "1.0,nan"], "--keep must be in (0, 1], got nan"),
    (["--keep", ","], "--keep: give at least one keep ratio"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "0"], "--threads must be in 1.."),
    (["--threads", "100000"], "--threads must be in 1.."),
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


def _one_error_line(res, *words):
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in res.output


@pytest.mark.parametrize("frames", ["8", "0"])
def test_memory_frames_are_bounded_by_the_bundles_bank(bundle_dir, tmp_path, frames):
    """The bank never holds more than num_maskmem frames (7 here): 100000 grew to 22 GB."""
    res = CliRunner().invoke(main, ["--bundle", str(bundle_dir), "--out", str(tmp_path / "r"),
                                    "--memory-frames", frames])
    assert res.exit_code == 2, res.output
    _one_error_line(res, "--memory-frames must be in 1..7", "num_maskmem", f"got {frames}")
    assert not (tmp_path / "r").exists()


def test_cpu_defaults_are_a_few_frames_with_a_progress_bar(bundle_dir, tmp_path):
    """No --warmup/--iters on a CPU backend: CPU_COUNTS (a 1024-px frame takes seconds there);
    a bar per keep on stderr, none with --quiet; the memory bank defaults to num_maskmem."""
    from fastsam2.runtime.profiling import CPU_COUNTS, GPU_COUNTS, frame_counts

    assert frame_counts("ort-cpu") == frame_counts("openvino") == CPU_COUNTS == (1, 5)
    assert frame_counts("tensorrt") == frame_counts("ort-cuda") == GPU_COUNTS
    assert frame_counts("ort-cpu", 0, 2) == (0, 2)
    res = CliRunner().invoke(main, ["--bundle", str(bundle_dir), "--backend", "ort-cpu", "--keep", "0.5",
                                    "--threads", str(THREADS), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    (r,) = rep["results"]
    assert (r["warmup"], r["iters"], r["frame"]["samples"]) == (1, 5, 5)
    assert rep["settings"]["memory_frames"] == 7 and rep["status"] == "complete"
    assert "ort-cpu keep 0.5" in res.stderr and "6/6" in res.stderr  # tqdm: warm-up + timed frames
    assert "1 warm-up + 5 timed frames per keep" in (tmp_path / "r" / "report.md").read_text()
    res = CliRunner().invoke(main, ["--bundle", str(bundle_dir), "--backend", "ort-cpu", "--keep", "0.5",
                                    "--iters", "1", "--warmup", "0", "--out", str(tmp_path / "q"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""


def test_an_earlier_report_is_replaced_only_with_force(bundle_dir, tmp_path):
    """As fastsam2-run: --out holding a report is refused without --force (nothing changes); a
    report.md the folder's record does not list is the user's: refused, force or not."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("the user's own notes")
    args = ["--bundle", str(bundle_dir), "--backend", "ort-cpu", "--keep", "0.5", "--warmup", "0",
            "--iters", "1", "--out", str(out), "--quiet"]
    for force in ([], ["--force"]):
        res = CliRunner().invoke(main, args + force)
        assert res.exit_code == 2, res.output
        _one_error_line(res, "report.md was not written by fastsam2")
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert (out / "report.md").read_text() == "the user's own notes"
    (out / "report.md").rename(tmp_path / "mine.md")
    (out / "mine.txt").write_text("the user's")
    assert CliRunner().invoke(main, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    _one_error_line(res, "holds an earlier run's outputs (report.json, report.md, latency.png)", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = CliRunner().invoke(main, args + ["--keep", "1.0", "--force"])
    assert res.exit_code == 0, res.output
    assert [r["keep"] for r in json.loads((out / "report.json").read_text())["results"]] == [1.0]
    assert (out / "mine.txt").read_text() == "the user's"


@pytest.mark.parametrize("signal_name, code, how", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_keeps_the_keeps_already_measured(bundle_dir, tmp_path, monkeypatch, signal_name, code, how):
    """Ctrl-C (SIGTERM) during the second keep: exit 130 (143), one line, report.json/md hold the
    first keep with status interrupted (it used to delete the whole --out)."""
    import signal

    from fastsam2.runtime import profiling
    from fastsam2.runtime.cli_edge import Terminated

    real, calls = profiling._profile_keep, []

    def interrupted_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # what the signal raises where the program is (cli_edge)
            raise KeyboardInterrupt if signal_name == "SIGINT" else Terminated(signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(profiling, "_profile_keep", interrupted_second)
    out = tmp_path / "r"
    res = CliRunner().invoke(main, ["--bundle", str(bundle_dir), "--backend", "ort-cpu", "--keep", "1.0,0.5",
                                    "--warmup", "0", "--iters", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == code, res.output
    _one_error_line(res, f"interrupted by {how}", "report.json and report.md (status interrupted)")
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "interrupted" and [r["keep"] for r in rep["results"]] == [1.0]
    assert "status: interrupted after 1 of 2 keeps" in (out / "report.md").read_text()
    # recorded as this run's (a later --force replaces them)
    assert sorted(p.name for p in out.iterdir()) == [RECORD_NAME, "report.json", "report.md"]


def test_shares_add_up_to_100_and_the_bar_is_its_label(report_dir, tmp_path):
    """Shares are of the graphs' summed medians (the frame median is another statistic: shares
    of it summed to 108 %); latency.png's label is its bar's own height."""
    from fastsam2.runtime.profile_report import graph_shares, plot_latency, report_markdown

    rep = json.loads((report_dir / "report.json").read_text())
    for r in rep["results"]:  # a frame median well under the graphs' sum, as seen at keep 1.0
        r["frame"]["median_ms"] = 0.9 * sum(v["median_ms"] for v in r["graphs"].values() if v["in_frame"])
    md = report_markdown(rep)
    sections = md.split("\n## ")[2:]
    assert len(sections) == len(KEEPS)
    for sec in sections:
        shares = [int(line.split("|")[6].strip(" %")) for line in sec.splitlines()
                  if line.startswith("| ") and line.split("|")[1].strip() in GRAPH_ORDER
                  and line.split("|")[6].strip() != "–"]
        assert sum(shares) == 100, sec
    thirds = {"graphs": {g: {"median_ms": 1.0, "in_frame": g != "router"} for g in GRAPH_ORDER}}
    assert sum(graph_shares(thirds).values()) == 100 and sorted(graph_shares(thirds).values()) == [25] * 4
    odd = {"graphs": {g: {"median_ms": m, "in_frame": True} for g, m in zip(GRAPH_ORDER, (1, 1, 1, 0, 0))}}
    assert sorted(graph_shares(odd).values()) == [0, 0, 33, 33, 34]
    tops = plot_latency(rep, tmp_path / "latency.png")
    for (top, label), r in zip(tops, rep["results"]):
        summed = sum(v["median_ms"] for v in r["graphs"].values() if v["in_frame"])
        assert top == pytest.approx(summed) and label == f"{summed:.0f} ms"


def test_help_lists_every_backend():
    from fastsam2.runtime.backends import BACKENDS

    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert f"--backend [{'|'.join(BACKENDS)}]" in text and "openvino" in BACKENDS


@pytest.mark.parametrize("args, words", [(["--iters", "abc"], "invalid value for '--iters'"),
                                         (["--keep"], "option '--keep' requires an argument"),
                                         ([], "missing option '--bundle'")])
def test_click_usage_errors_are_one_line(args, words):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    _one_error_line(res, words, "--help)")


def test_graphs_run_in_the_tracking_loops_order(bundle_dir):
    """Each profiled iteration runs the graphs in the order a tracked frame of the session
    runs them (the memory encoder encodes the mask the decoder just made)."""
    import numpy as np

    from fastsam2.runtime.backends import open_backend
    from fastsam2.runtime.bundle import load_bundle
    from fastsam2.runtime.contract import geometry
    from fastsam2.runtime.profiling import _profile_keep
    from fastsam2.runtime.session import Session

    class Recording:
        def __init__(self, name, inner, calls):
            self.name, self.inner, self.calls = name, inner, calls

        def run(self, feeds):
            self.calls.append(self.name)
            return self.inner.run(feeds) if self.inner is not None else {}

    bundle = load_bundle(bundle_dir)
    name, sessions = open_backend("ort-cpu", bundle, THREADS, warn=lambda m: None)
    tracked = []
    frames = np.random.default_rng(0).integers(0, 255, (2, 96, 128, 3), dtype=np.uint8)
    with Session.open(bundle, keep=0.5, graphs=(name, {g: Recording(g, s, tracked) for g, s in sessions.items()}),
                      warn=lambda m: None) as s:
        s.add_prompt(1, points=[(40, 30)])
        s.push(frames[0])
        del tracked[:]
        s.push(frames[1])  # a tracked frame at keep 0.5: every graph, the router included
    profiled = []
    dims = geometry(bundle.manifest["image_size"], bundle.settings["text_dim"]) | {"B": 1, "P": 1, "ptrs": 2}
    _profile_keep({g: Recording(g, None, profiled) for g in GRAPH_ORDER}, dims, keep_to_k(0.5, dims["T"]),
                  2, 0, 1, seed=0)
    assert sorted(tracked) == sorted(GRAPH_ORDER)
    assert profiled == tracked
