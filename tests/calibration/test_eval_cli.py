"""fastsam2-eval on a tiny DAVIS layout built here: the CSVs users get, and one-line errors."""

import csv

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fastsam2.calibration.davis import evaluate_davis
from fastsam2.calibration.eval_cli import main

SHAPE = (48, 64)


def save_palette_png(index_map, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(index_map.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [255, 255, 255] * 252)
    im.save(path)


def annotation(t, n_objects):
    m = np.zeros(SHAPE, np.uint8)
    m[8:24, 4 + 2 * t:24 + 2 * t] = 1
    if n_objects > 1:
        m[28:44, 40 - t:56 - t] = 2
        m[27, 38 - t:58 - t] = 255  # a void band, as DAVIS draws around objects
    return m


def perturb(m, t):
    """What a tracker might return: object 1 a little too wide, object 2 shrinking over time."""
    r = np.where(m == 255, 0, m)
    ys, xs = np.nonzero(r == 1)
    r[ys.min():ys.max() + 1, xs.max() + 1:xs.max() + 3] = 1
    r[28:28 + t, :][r[28:28 + t, :] == 2] = 0
    return r


SEQUENCES = {"alpha": (1, 5), "beta": (2, 7)}  # name: (objects, frames)


@pytest.fixture(scope="session")
def davis_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("DAVIS")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\nbeta\n")
    for seq, (n_objects, n_frames) in SEQUENCES.items():
        (root / "JPEGImages" / "480p" / seq).mkdir(parents=True)
        for t in range(n_frames):
            Image.new("RGB", SHAPE[::-1], (90, 120, 150)).save(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg")
            save_palette_png(annotation(t, n_objects), root / "Annotations" / "480p" / seq / f"{t:05d}.png")
    return root


@pytest.fixture
def results(tmp_path):
    out = tmp_path / "res"
    for seq, (n_objects, n_frames) in SEQUENCES.items():
        for t in range(n_frames):
            save_palette_png(perturb(annotation(t, n_objects), t), out / seq / f"{t:05d}.png")
    return out


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_csv(path):
    text = path.read_text()
    assert "\r" not in text  # pandas-style "\n" line ends, as the official CSVs
    return list(csv.reader(text.splitlines()))


def test_scores_results_and_writes_the_official_csvs(davis_root, results):
    result = run("--davis", davis_root, "--split", "val", "--results", results)
    assert result.exit_code == 0, result.output
    global_row, per_seq = evaluate_davis(davis_root, results, "val")

    rows = read_csv(results / "global_results-val.csv")
    assert rows[0] == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert rows[1] == ["%.3f" % global_row[c] for c in rows[0]]
    assert float(rows[1][0]) == pytest.approx((global_row["J-Mean"] + global_row["F-Mean"]) / 2, abs=1e-3)

    rows = read_csv(results / "per-sequence_results-val.csv")
    assert rows[0] == ["Sequence", "J-Mean", "F-Mean"]
    assert [r[0] for r in rows[1:]] == ["alpha_1", "beta_1", "beta_2"]
    assert rows[1:] == [[r["Sequence"], "%.3f" % r["J-Mean"], "%.3f" % r["F-Mean"]] for r in per_seq]

    # the perturbation is real but small, and object 2's error grows over time (a decay)
    assert 0.5 < global_row["J-Mean"] < 1.0
    assert global_row["J-Decay"] > 0
    # J&F is the mean over objects, not over sequences
    assert global_row["J-Mean"] == pytest.approx(np.mean([r["J-Mean"] for r in per_seq]))
    # and the global table is printed
    assert "J&F-Mean" in result.stdout and "%.3f" % global_row["J&F-Mean"] in result.stdout


def test_ground_truth_as_results_scores_one(davis_root, tmp_path):
    for seq, (n_objects, n_frames) in SEQUENCES.items():
        for t in range(n_frames):
            m = annotation(t, n_objects)
            save_palette_png(np.where(m == 255, 0, m), tmp_path / seq / f"{t:05d}.png")
    global_row, _ = evaluate_davis(davis_root, tmp_path, "val")
    assert global_row == pytest.approx({"J&F-Mean": 1, "J-Mean": 1, "J-Recall": 1, "J-Decay": 0,
                                        "F-Mean": 1, "F-Recall": 1, "F-Decay": 0})


def test_sequences_option_and_unscored_first_frame(davis_root, results):
    (results / "beta" / "00000.png").unlink()  # the given annotation: never scored, not needed
    result = run("--davis", davis_root, "--results", results, "--sequences", "beta")
    assert result.exit_code == 0, result.output
    rows = read_csv(results / "per-sequence_results-val.csv")
    assert [r[0] for r in rows[1:]] == ["beta_1", "beta_2"]


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0]


def test_missing_davis_folder(tmp_path, results):
    assert_one_line_error(run("--davis", tmp_path / "nope", "--results", results), "DAVIS folder", "nope")


def test_missing_split_file(davis_root, results):
    assert_one_line_error(run("--davis", davis_root, "--split", "train", "--results", results), "train.txt")


def test_missing_results_folder(davis_root, tmp_path):
    assert_one_line_error(run("--davis", davis_root, "--results", tmp_path / "none"), "results folder")


def test_missing_results_frame(davis_root, results):
    (results / "alpha" / "00002.png").unlink()
    assert_one_line_error(run("--davis", davis_root, "--results", results), "00002.png")


def test_neither_results_nor_bundle(davis_root):
    assert_one_line_error(run("--davis", davis_root), "--results")


def test_run_mode_needs_out(davis_root, tmp_path):
    assert_one_line_error(run("--davis", davis_root, "--bundle", tmp_path), "--out")


def test_run_mode_keep_auto_and_one_run_per_folder(bundle_dir, tmp_path):
    """--keep auto and the default --backend (auto), as fastsam2-run; --out holding an earlier
    run's masks is refused without --force and replaced whole with it; a mask the folder's record
    of the last run does not list is the user's: refused, force or not (the user's files stay)."""
    from fastsam2.calibration.synthetic import make_davis_layout
    from fastsam2.runtime.run_folder import RECORD_NAME

    root = tmp_path / "DAVIS"
    make_davis_layout(root, {"one": dict(num_frames=3, seed=6, size=(96, 128))})
    out = tmp_path / "res"
    (out / "one").mkdir(parents=True)
    (out / "one" / "00007.png").write_bytes(b"the user's own mask")
    (out / "notes.txt").write_text("mine")
    args = ["--davis", root, "--split", "val", "--bundle", bundle_dir, "--keep", "auto", "--out", out, "--quiet"]
    for force in ((), ("--force",)):
        assert_one_line_error(run(*args, *force), "one/00007.png was not written by fastsam2")
    assert (out / "one" / "00007.png").read_bytes() == b"the user's own mask"
    (out / "one" / "00007.png").unlink()
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert_one_line_error(run(*args), "earlier run's outputs (one/", "--force")
    res = run(*args, "--force")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "one").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in out.iterdir()) == [RECORD_NAME, "global_results-val.csv", "notes.txt", "one",
                                                    "per-sequence_results-val.csv"]
    assert_one_line_error(run("--davis", root, "--bundle", bundle_dir, "--keep", "most", "--out", tmp_path / "r2"),
                          "--keep")


def test_run_mode_tracks_davis_layout_and_scores(bundle_dir, tmp_path):
    """fastsam2-eval --bundle: first-frame masks as prompts (several objects), then J&F."""
    from fastsam2.calibration.synthetic import make_davis_layout
    from fastsam2.runtime.outputs import read_palette_png

    root = tmp_path / "DAVIS"
    make_davis_layout(root, {"two": dict(num_frames=5, objects=2, seed=4, size=(120, 160)),
                             "one": dict(num_frames=4, seed=6, size=(120, 160))})
    out = tmp_path / "res"
    res = CliRunner().invoke(main, ["--davis", str(root), "--split", "val", "--bundle", str(bundle_dir),
                                    "--keep", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "two").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    first = read_palette_png(out / "two" / "00000.png")
    gt = read_palette_png(root / "Annotations" / "480p" / "two" / "00000.png")
    assert mask_iou_ids(first, gt) > 0.9  # frame 0 is the prompt mask itself
    assert (out / "global_results-val.csv").read_text().startswith("J&F-Mean,J-Mean")
    rows = (out / "per-sequence_results-val.csv").read_text().splitlines()
    assert sorted(r.split(",")[0] for r in rows[1:]) == ["one_1", "two_1", "two_2"]


def mask_iou_ids(a, b):
    inter = sum(int(((a == i) & (b == i)).sum()) for i in (1, 2))
    union = sum(int(((a == i) | (b == i)).sum()) for i in (1, 2))
    return inter / union


def test_shared_flags_match_fastsam2_run():
    """One vocabulary: every backend fastsam2-run offers (openvino too), --threads, --quiet, --force."""
    from fastsam2.runtime.backends import BACKENDS

    res = run("--help")
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert f"--backend [{'|'.join(BACKENDS)}]" in text and "openvino" in BACKENDS
    for flag in ("--threads INTEGER", "--quiet", "--force"):
        assert flag in text, flag


def test_run_mode_threads_and_quiet(bundle_dir, tmp_path):
    """A line per tracked sequence on stderr (none with --quiet); --threads checked as
    fastsam2-run checks it, before --out is made."""
    from fastsam2.calibration.synthetic import make_davis_layout

    root = tmp_path / "DAVIS"
    make_davis_layout(root, {"one": dict(num_frames=3, seed=6, size=(96, 128))})
    args = ["--davis", root, "--bundle", bundle_dir, "--backend", "ort-cpu", "--threads", "1"]
    res = run(*args, "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert res.stderr.startswith("[1/1] one: 3 frames, 1 objects, "), res.stderr
    res = run(*args, "--out", tmp_path / "b", "--quiet")
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and "J&F-Mean" in res.stdout
    assert_one_line_error(run("--davis", root, "--bundle", bundle_dir, "--threads", "100000", "--out",
                              tmp_path / "c"), "--threads must be in 1..")
    assert not (tmp_path / "c").exists()


def test_click_usage_errors_are_one_line(davis_root):
    assert_one_line_error(run("--davis", davis_root, "--backend", "cuda-magic"), "invalid value for '--backend'",
                          "'openvino'")
    assert_one_line_error(run("--results", "r"), "missing option '--davis'")
