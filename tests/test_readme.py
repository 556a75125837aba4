"""The README as a new user reads it: every ```bash block pastes and runs, or says at its top
what it needs that CI lacks (`# needs: ...`, tests/readme_blocks.py); the setup it starts from
(scripts/install.sh, scripts/demo.sh) says what it does and can be run twice.

The runnable blocks run as written, in a folder prepared like the README assumes. What differs
from a user's folder: bundle/ is the test model at 256 px (tests/conftest.py's bundle: prompts
"cyclist" and "red ball"), video.mp4 is 9 generated frames at 640x480 (the live example's
prompts reach frame 8), frames/ holds 3 of them, prompts.json is the README's own JSON block.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import own_bundle
from readme_blocks import NEEDS, README, blocks, commands, paste_problems

ROOT = README.parent
BASH = [b for b in blocks() if b.lang == "bash"]
RUNNABLE = [b for b in BASH if not b.needs]
VIDEO_FRAMES = 9


def _env(**extra) -> dict:
    env = dict(os.environ)
    # the fastsam2-* commands of this interpreter's environment, as after the install
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def test_every_bash_block_runs_here_or_says_what_it_needs():
    assert len(BASH) >= 8 and len(RUNNABLE) >= 2
    for b in BASH:
        unknown = [n for n in b.needs if n not in NEEDS]
        assert not unknown, f"{b.name}: '# needs:' names {unknown}; known: {sorted(NEEDS)}"
    # a block that only tracks local files needs nothing CI lacks: it must not hide behind a mark
    for b in BASH:
        cmds = [c for c, _ in commands(b.text)]
        if b.needs and cmds and set(cmds) == {"fastsam2-run"} and "camera" not in b.needs:
            assert "--server" in b.text, f"{b.name} is marked {b.needs} but only runs fastsam2-run"


@pytest.mark.parametrize("block", BASH, ids=lambda b: b.name)
def test_block_pastes_into_a_shell(block):
    """No `\\` followed by a comment or blanks (the line after it would run on its own), and
    bash parses it."""
    assert paste_problems(block.text) == [], block.name
    r = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert r.returncode == 0, f"{block.name}: {r.stderr}"


def test_marked_blocks_use_flags_the_commands_have():
    """Blocks that cannot run here still name real flags (each command's --help lists them)."""
    wanted: dict = {}
    for b in BASH:
        if b.needs:
            for cmd, flags in commands(b.text):
                wanted.setdefault(cmd, set()).update(flags)
    assert wanted
    for cmd, flags in sorted(wanted.items()):
        r = subprocess.run([cmd, "--help"], capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 0, f"{cmd} --help: {r.stderr[-500:]}"
        missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", r.stdout))
        assert not missing, f"the README gives {cmd} flags its --help does not list: {missing}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bundle_dir):
    """A folder as the README assumes it: bundle/, video.mp4, frames/, prompts.json."""
    from fastsam2.calibration.synthetic import make_video

    work = tmp_path_factory.mktemp("readme")
    gen = tmp_path_factory.mktemp("readme_gen")
    own_bundle(bundle_dir, work / "bundle")
    v = make_video(gen / "v", num_frames=VIDEO_FRAMES, size=(480, 640), seed=1, fmt="mp4")
    shutil.move(v.frames_dir_or_file, work / "video.mp4")
    f = make_video(gen / "f", num_frames=3, size=(480, 640), seed=2, fmt="jpg")
    shutil.move(f.frames_dir_or_file, work / "frames")
    (schedule,) = [b for b in blocks() if b.lang == "json" and '"prompts"' in b.text]
    json.loads(schedule.text)  # the README's example is valid JSON
    (work / "prompts.json").write_text(schedule.text)
    return work


def _outs(code: str) -> list:
    """The output folder of each fastsam2-run in a block (--out, or the default results/)."""
    joined = re.sub(r"\\\n", " ", code)
    outs = []
    for line in joined.split("\n"):
        if line.startswith("fastsam2-run "):
            m = re.search(r"--out\s+(\S+)", line.split(" #", 1)[0])
            outs.append(m.group(1) if m else "results")
    return outs


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_block_runs_as_written(block, folder):
    script = folder / f"block_{block.line}.sh"
    script.write_text(block.text)
    r = subprocess.run(["bash", "-e", "-o", "pipefail", script.name], cwd=folder, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{block.name} exited {r.returncode}:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    for out in _outs(block.text):
        res = json.loads((folder / out / "results.json").read_text())
        assert res["status"] == "finished", (block.name, out)
        masks = sorted((folder / out / "masks").glob("*.png"))
        frames = 3 if res["input"].startswith("frames") else VIDEO_FRAMES
        assert len(masks) == len(res["frames"]) == frames, (block.name, out)


def test_the_live_example_applies_its_whole_schedule(folder):
    """The live-tracking block (README: 'Live tracking') and its prompts file: three objects,
    one removed, prompts on the frames the README names."""
    live = json.loads((folder / "live" / "results.json").read_text())
    assert sorted(int(o) for o in live["objects"]) == [1, 2, 3]
    assert [(r["object"], r["frame"]) for r in live["removals"]] == [(2, 8)]
    assert sorted({(p["object"], p["frame"]) for p in live["prompts"]}) == [(1, 0), (1, 3), (2, 4), (3, 6)]
    last = live["frames"][-1]["objects"]
    assert "2" not in last and 2 not in last  # removed from frame 8 on
    sched = json.loads((folder / "scheduled" / "results.json").read_text())
    assert sorted({(p["object"], p["frame"]) for p in sched["prompts"]}) == [(1, 0), (1, 3), (2, 4)]


# -- the setup block: scripts/demo.sh and scripts/install.sh --------------------------------


def test_demo_runs_twice_and_prompts_what_it_shows(tmp_path):
    """bash scripts/demo.sh a second time reuses its bundle and replaces its own results
    (it exited 2: "holds an earlier run's outputs"); its text prompt names the colour of the
    object it clicks. At 256 px and 3 frames (IMAGE_SIZE, FRAMES), install skipped."""
    out = tmp_path / "demo_out"
    env = _env(IMAGE_SIZE="256", FRAMES="3", FASTSAM2_SKIP_INSTALL="1", PYTHON=sys.executable)
    runs = []
    for _ in range(2):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), str(out)], env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(r)
        if len(runs) == 1:
            manifest = (out / "bundle" / "manifest.json").stat()
    assert "wrote bundle" in runs[0].stdout + runs[0].stderr
    assert "reusing" in runs[1].stderr and "wrote bundle" not in runs[1].stdout + runs[1].stderr
    assert (out / "bundle" / "manifest.json").stat().st_mtime_ns == manifest.st_mtime_ns
    res = json.loads((out / "results" / "results.json").read_text())
    assert res["status"] == "finished" and len(list((out / "results" / "masks").glob("*.png"))) == 3
    texts = {p.get("text") for p in res["prompts"]} - {None}
    (x, y), = {(int(round(px)), int(round(py))) for p in res["prompts"] for px, py in p.get("points", [])}
    from fastsam2.runtime.video import open_frames

    with open_frames(out / "video" / "video.mp4") as src:
        rgb = next(iter(src))[1].astype(float)
    rgb_mean = rgb[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(0)
    colour = ("red", "green", "blue")[int(np.argmax(rgb_mean))]
    assert np.sort(rgb_mean)[-1] > np.sort(rgb_mean)[-2] + 40, rgb_mean  # a saturated colour
    assert texts == {f"{colour} disc"}, (texts, rgb_mean)
    # the demo regenerates its own video folder, and nothing else there
    (out / "video" / "mine.txt").write_text("a user's file")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "mine.txt" in r.stderr
    assert (out / "video" / "mine.txt").read_text() == "a user's file"
    assert (out / "video" / "video.mp4").is_file()


# scripts/install.sh with stand-ins for python, pip, dpkg-query and apt-get (what it prints and
# which installs it starts; the real install is CI's first step)
FAKE_PY = r"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then
  echo "pip ${*:3}" >> "$FAKE_LOG"
  echo "ERROR: pip's dependency resolver does not currently take into account all the packages that are installed. This behaviour is the source of the following dependency conflicts." >&2
  echo "nvidia-pytriton 0.5.14 requires grpcio>=1.64.1, which is not installed." >&2
  echo "WARNING: Running pip as the 'root' user can result in broken permissions" >&2
  echo "pip: a line of its own" >&2
  exit 0
fi
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$4/bin" && cp "$0" "$4/bin/python"; echo "venv" >> "$FAKE_LOG"; exit 0; fi
installed=$([ "$FAKE_STATE" = installed ] && echo 0 || echo 1)
if [ "$1" = - ]; then cat > /dev/null; exit "$installed"; fi
case "$2" in
  *sys.executable*) echo /fake/python ;;
  *fastsam2.export*) [ "$installed" = 0 ] && echo "$PWD/export" ;;
  *setuptools*) exit 0 ;;
  *) exit "$installed" ;;
esac
"""
FAKE_DPKG = r"""#!/usr/bin/env bash
for p in "$@"; do grep -qx -- "$p" "$FAKE_DPKG" && echo "$p ii "; done; exit 0
"""
FAKE_APT = r"""#!/usr/bin/env bash
echo "apt-get $*" >> "$FAKE_LOG"
[ "$1" = install ] && for p in "$@"; do case "$p" in -*|install) ;; *) echo "$p" >> "$FAKE_DPKG";; esac; done
exit 0
"""
TOOLS = ("bash", "cat", "grep", "awk", "sha256sum", "cut", "mktemp", "rm", "tail", "dirname", "mkdir",
         "cp", "env", "id")


@pytest.fixture
def installer(tmp_path):
    """install(state, apt=True, uid=0) -> (rc, stderr, log lines) in a copy of the repository's
    install.sh, with PATH holding only the tools it uses and the stand-ins."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), bin_ / tool)
    fakes = {"python3": FAKE_PY, "dpkg-query": FAKE_DPKG, "apt-get": FAKE_APT, "sudo": "#!/bin/sh\nexit 1\n"}
    for name, text in fakes.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log, dpkg = tmp_path / "log", tmp_path / "dpkg"
    dpkg.write_text("python3-gi\nffmpeg\n")

    def install(state, apt=True, uid=0):
        (bin_ / "apt-get").unlink(missing_ok=True)
        if apt:
            (bin_ / "apt-get").write_text(FAKE_APT)
            (bin_ / "apt-get").chmod(0o755)
        (bin_ / "id").unlink()
        if uid:
            (bin_ / "id").write_text(f"#!/bin/sh\necho {uid}\n")
            (bin_ / "id").chmod(0o755)
        else:
            os.symlink(shutil.which("id"), bin_ / "id")
        start = len(log.read_text().splitlines()) if log.exists() else 0
        env = {"PATH": str(bin_), "PYTHON": str(bin_ / "python3"), "FAKE_LOG": str(log),
               "FAKE_DPKG": str(dpkg), "FAKE_STATE": state, "HOME": str(tmp_path)}
        r = subprocess.run([str(bin_ / "bash"), "scripts/install.sh"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr, (log.read_text().splitlines() if log.exists() else [])[start:]

    install.dpkg = dpkg
    return install


def test_install_says_each_step_and_hides_the_expected_pip_error(installer):
    rc, err, log = installer("fresh")
    assert rc == 0, err
    steps = [line for line in err.splitlines() if line.startswith("install.sh: ")]
    assert [s.split(":")[1].split()[0] for s in steps] == [
        "system", "torch", "sam2", "fastsam2", "nvidia-pytriton's", ".venv-serve", "numpy<2", "done"]
    # the --no-deps resolver complaint and pip's root advice are left out; pip's other lines stay
    assert "ERROR" not in err and "nvidia-pytriton 0.5.14 requires" not in err and "root" not in err
    assert err.count("pip: a line of its own") == sum(1 for line in log if line.startswith("pip "))
    assert "pip install -q --no-deps nvidia-pytriton>=0.5" in log
    # apt: one update, then the missing packages only
    apt = [line for line in log if line.startswith("apt-get")]
    assert apt[0] == "apt-get update -q" and len(apt) == 2
    assert "ffmpeg" not in apt[1] and "python3-gi " not in apt[1] + " "
    assert "redis-server" in apt[1] and "gir1.2-gst-rtsp-server-1.0" in apt[1]


def test_install_rerun_is_one_line_and_installs_nothing(installer):
    installer("fresh")
    rc, err, log = installer("installed")
    assert (rc, err, log) == (0, "install.sh: everything is installed already\n", [])


def test_install_without_apt_or_root_says_what_to_install(installer):
    rc, err, log = installer("installed", apt=False)
    assert rc == 0 and not [line for line in log if line.startswith("apt-get")]
    assert "no apt here" in err and "gstreamer1.0-rtsp" in err
    rc, err, log = installer("installed", uid=1000)
    assert rc == 0 and log == []  # neither apt-get nor sudo ran (and the rest was installed)
    assert "not root and no sudo" in err and "apt-get install -y redis-server" in err
    assert "python3-gi" not in err.split("apt-get install -y", 1)[1]  # only what is missing
