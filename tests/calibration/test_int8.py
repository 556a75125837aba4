"""fastsam2-calibrate int8 on the 256-px cpu bundle: the npz files users hand to TensorRT."""

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import own_bundle
from fastsam2.calibration.calibrate_cli import main
from fastsam2.export.feeds import load_feeds
from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, PTR_TOKENS, keep_to_k

FRAMES = 3
S, G, T = 256, 16, 256


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from fastsam2.calibration.synthetic import make_video

    return make_video(tmp_path_factory.mktemp("int8v"), num_frames=5, size=(120, 160), seed=3).frames_dir_or_file


@pytest.fixture(scope="module")
def calibrated(bundle_dir, frames, tmp_path_factory):
    b = own_bundle(bundle_dir, tmp_path_factory.mktemp("int8b") / "b")
    res = CliRunner().invoke(main, ["int8", "--bundle", str(b), "--frames", str(frames),
                                    "--max-frames", str(FRAMES), "--threads", "1"])
    assert res.exit_code == 0, res.output
    return b / "engines" / "cpu", res.output


def test_one_npz_per_graph_with_the_contract_inputs(calibrated):
    out, text = calibrated
    assert "wrote 5 calibration files" in text and "no TensorRT here" in text
    for g in GRAPH_ORDER:
        with np.load(out / f"calib_{g}.npz") as z:
            assert [str(n) for n in z["input_names"]] == GRAPHS[g].input_names
        feeds = load_feeds(out / f"calib_{g}.npz")
        assert feeds and all(set(f) == set(GRAPHS[g].input_names) for f in feeds)
        for f in feeds:  # dtypes are the contract's: int64 indices stay int64
            for spec in GRAPHS[g].inputs:
                assert f[spec.name].dtype == np.dtype(spec.dtype), (g, spec.name)
    readme = (out / "int8_README.txt").read_text()
    assert "--int8" in readme and "--calib=calibration_<graph>.cache" in readme


def test_shapes_match_the_contract(calibrated):
    out, _ = calibrated
    with np.load(out / "calib_image_encoder.npz") as z:
        assert z["image"].shape == (FRAMES, 1, 3, S, S)
    with np.load(out / "calib_router.npz") as z:  # keep 1.0 skips top-k; recorded anyway
        assert z["feat"].shape == (FRAMES, 1, 256, G, G) and z["prev_mask_logits"].shape == (FRAMES, 1, 1, 4 * G, 4 * G)
    with np.load(out / "calib_mask_decoder.npz") as z:
        assert z["high_res_0"].shape == (FRAMES, 1, 32, 4 * G, 4 * G)
    ma = load_feeds(out / "calib_memory_attention.npz")
    assert len(ma) == FRAMES - 1  # every tracked frame, not the prompted one
    n = keep_to_k(1.0, T)  # the bundle's keep
    for i, f in enumerate(ma):
        assert f["curr"].shape == (n, 256) and f["curr_idx"].shape == (n,)
        ms = f["memory_idx"].shape[0]
        assert ms == T * (i + 1)  # conditioning frame + i remembered frames, all tokens kept
        assert f["memory"].shape == (ms + PTR_TOKENS * (i + 1), 64)  # + one pointer per past frame
    with np.load(out / "calib_memory_attention.npz") as z:
        assert "curr" in z.files and "memory_0" in z.files and "memory" not in z.files  # M grows


def test_keep_below_one_records_pruned_memory_attention(bundle_dir, frames, tmp_path):
    from fastsam2.calibration.int8 import write_int8_calibration

    b = own_bundle(bundle_dir, tmp_path / "b")
    summary = write_int8_calibration(b, frames, max_frames=FRAMES, keep=0.5, point=(80, 60), threads=1)
    ma = load_feeds(b / "engines" / "cpu" / "calib_memory_attention.npz")
    assert all(f["curr"].shape == (keep_to_k(0.5, T), 256) for f in ma)
    assert summary["graphs"]["router"]["batches"] == FRAMES and summary["caches"] == []


@pytest.mark.parametrize("args, needle", [
    (["--bundle", "/nonexistent"], "bundle folder not found"),
    (["--frames", "/nonexistent"], "no such file or folder"),
    (["--max-frames", "0"], "--max-frames must be >= 1"),
    (["--target", "nowhere"], "unknown target 'nowhere'"),
    (["--prompt", "zebra"], "prompt 'zebra' is not in the bundle"),
    (["--point", "5"], "--point must look like x,y"),
    (["--keep", "1.5"], "--keep must be in (0, 1]"),
])
def test_bad_input_is_one_line_exit_2(bundle_dir, frames, args, needle):
    base = {"--bundle": str(bundle_dir), "--frames": str(frames)}
    for k in list(base):
        if k in args:
            base.pop(k)
    cmd = ["int8", *[x for kv in base.items() for x in kv], *args]
    res = CliRunner().invoke(main, cmd)
    assert res.exit_code == 2, res.output
    assert needle in res.output and res.output.count("\n") == 1, res.output
    assert not (bundle_dir / "engines").exists()  # nothing written into the shared bundle


def test_cpu_int8_reads_the_calibration_data(calibrated, bundle_dir, tmp_path):
    """fastsam2.export.precision calibrates its static int8 variants on these files when given
    the folder (README's `--calibration engines/<target>/`): the same feeds, every graph."""
    from fastsam2.export.precision import calibration_feeds
    from fastsam2.runtime.bundle import load_bundle

    out, _ = calibrated
    feeds, what = calibration_feeds(load_bundle(bundle_dir), out, tmp_path, 8, 1)
    assert "fastsam2-calibrate int8 data" in what and set(feeds) == set(GRAPH_ORDER)
    assert len(feeds["image_encoder"]) == FRAMES and feeds["image_encoder"][0]["image"].shape == (1, 3, S, S)
    assert "python -m fastsam2.export.precision" in (out / "int8_README.txt").read_text()
