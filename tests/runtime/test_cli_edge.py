"""One command-line edge for every fastsam2 command (fastsam2.runtime.cli_edge): a flag click
cannot parse, a missing required option or a bad value is one `error:` line and exit 2 in each
of them, never click's usage block or a traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# a command line each command refuses at parse time, before any work
BAD = {
    "fastsam2-export": ["--target", "cpu", "--out", "b", "--image-size", "big"],
    "fastsam2-run": ["video.mp4", "--bundle", "b", "--max-frames", "many"],
    "fastsam2-profile": ["--bundle", "b", "--iters", "x"],
    "fastsam2-eval": ["--davis", "d", "--threads", "x"],
    "fastsam2-calibrate": ["router", "--max-frames", "x"],
    "fastsam2-serve": ["--bundle", "b", "--repo", "r", "--http-port", "x"],
}


def run(script: str, args: list) -> subprocess.CompletedProcess:
    module, func = SCRIPTS[script].split(":")
    code = f"import sys; from {module} import {func} as m; sys.argv[0] = {script!r}; m()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_every_command_is_listed():
    assert sorted(BAD) == sorted(SCRIPTS)


def test_an_unknown_subcommand_is_one_line():
    r = run("fastsam2-calibrate", ["nope"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


@pytest.mark.parametrize("script", sorted(BAD))
@pytest.mark.parametrize("how", ["bad value", "unknown flag"])
def test_usage_errors_are_one_line(script, how):
    args = BAD[script] if how == "bad value" else [*BAD[script][:-2], "--no-such-flag"]
    r = run(script, args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "Usage:" not in r.stderr
