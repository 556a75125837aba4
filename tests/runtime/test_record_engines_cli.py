"""`python3 -m fastsam2.runtime.record_engines BUNDLE` (build_plan.sh's last step) is a click
command like every fastsam2 command: user errors are one `error:` line and exit 2. The recording
itself runs in test_trt_emulated.py's Jetson flow."""

from click.testing import CliRunner

from fastsam2.runtime.record_engines import main


def test_errors_are_one_line(bundle_dir, tmp_path):
    for args, words in (([str(tmp_path / "nope")], f"error: bundle folder not found: {tmp_path / 'nope'}"),
                        ([str(bundle_dir)], "was exported for a target without TensorRT engines")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
        assert res.stdout == ""


def test_help_names_the_module():
    res = CliRunner().invoke(main, ["--help"], prog_name="python3 -m fastsam2.runtime.record_engines")
    assert res.exit_code == 0
    assert "Usage: python3 -m fastsam2.runtime.record_engines [OPTIONS] BUNDLE" in res.output


def test_a_missing_bundle_argument_is_one_line():
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "error: missing argument 'BUNDLE' (see main --help)"], res.stderr
