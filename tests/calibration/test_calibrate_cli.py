"""fastsam2-calibrate's CLI layer: int8 takes --keep auto as fastsam2-run does, and never opens a
target file a bundle's manifest names."""

import json
import os

import pytest
from click.testing import CliRunner

from fastsam2.calibration.calibrate_cli import bundle_target, int8_keep, main
from fastsam2.profiles import load_profile
from fastsam2.runtime.errors import InputError


def linked_bundle(bundle_dir, dst):
    """Hard links (a link out of a bundle is refused): a folder this test may write into."""
    dst.mkdir()
    for p in bundle_dir.iterdir():
        os.link(p, dst / p.name)
    return dst


def test_int8_keep_auto_records_at_the_middle_of_the_targets_range(bundle_dir, tmp_path):
    from fastsam2.calibration.synthetic import make_video

    cpu = load_profile("cpu")
    mid = round((cpu.keep_min + cpu.keep_max) / 2, 4)
    assert int8_keep("auto", bundle_dir, None)[0] == mid
    assert int8_keep(None, bundle_dir, None)[0] == 1.0  # the bundle's keep
    frames = make_video(tmp_path / "v", num_frames=2, size=(96, 128), seed=3).frames_dir_or_file
    b = linked_bundle(bundle_dir, tmp_path / "b")
    res = CliRunner().invoke(main, ["int8", "--bundle", str(b), "--frames", str(frames), "--max-frames", "2",
                                    "--keep", "auto", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert f"recorded 2 frames at keep {mid}" in res.output
    assert (b / "engines" / "cpu" / "calib_memory_attention.npz").is_file()
    res = CliRunner().invoke(main, ["int8", "--bundle", str(b), "--frames", str(frames), "--keep", "most"])
    assert res.exit_code == 2 and res.output.startswith("error: --keep") and len(res.output.splitlines()) == 1


def test_a_target_file_named_by_the_manifest_is_not_opened(bundle_dir):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert bundle_target(m) == "cpu"
    for target in ("/etc/fastsam2/orin.toml", "../orin.toml", "profiles/orin"):
        with pytest.raises(InputError, match="pass --target"):
            bundle_target(dict(m, target=target))


@pytest.mark.parametrize("args, words", [(["int8", "--frames", "f"], "missing option '--bundle'"),
                                         (["int8", "--bundle", "b", "--frames", "f", "--threads", "x"],
                                          "invalid value for '--threads'"),
                                         (["router", "--frames", "f"], "missing option '--prompt'")])
def test_click_usage_errors_are_one_line(args, words):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
