"""The runtime's promise: it never imports torch, on import or while tracking."""

from __future__ import annotations

import json
import subprocess
import sys

RUNTIME_MODULES = ["fastsam2.runtime", "fastsam2.runtime.run_cli", "fastsam2.runtime.track",
                   "fastsam2.runtime.tracker", "fastsam2.runtime.bank", "fastsam2.runtime.backends",
                   "fastsam2.runtime.bundle", "fastsam2.runtime.video", "fastsam2.runtime.outputs",
                   "fastsam2.runtime.sam2_math", "fastsam2.runtime.trt_backend", "fastsam2.runtime.contract",
                   "fastsam2.runtime.profiling", "fastsam2.runtime.profile_report", "fastsam2.runtime.profile_cli",
                   "fastsam2.runtime.record_engines",
                   "fastsam2.profiles"]


def _py(code: str):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_importing_the_runtime_does_not_import_torch():
    code = ("import sys, importlib\n"
            f"for m in {RUNTIME_MODULES!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.')))")
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_tracking_runs_with_torch_unavailable(bundle_dir, synth, tmp_path):
    # torch set to None in sys.modules: any `import torch` on the way raises ImportError
    out = tmp_path / "r"
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fastsam2.runtime.track import track, PromptSpec\n"
            f"res = track({str(synth.frames_dir_or_file)!r}, {str(bundle_dir)!r}, PromptSpec(text='cyclist'), "
            f"{str(out)!r}, keep=0.5, backend='ort-cpu', overlay=True, max_frames=4, warn=lambda m: None)\n"
            "print(res['video']['frames'])")
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "4"
    assert json.loads((out / "results.json").read_text())["backend"] == "ort-cpu"
    assert (out / "overlay.mp4").stat().st_size > 0
