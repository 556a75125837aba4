"""The runtime's promise: it never imports torch, on import or while tracking."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules(package: str, skip=()) -> list:
    """Every module of a package, so a new one is guarded without being listed here."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    return [package] + sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if m.name not in skip)


# the runtime, the profiles, and the serving side (tracker_model.py runs inside Triton's python
# backend, whose triton_python_backend_utils exists only there; its imports are the runtime's)
RUNTIME_MODULES = (_modules("fastsam2.runtime") + ["fastsam2.profiles"]
                   + _modules("fastsam2.serve", skip=("tracker_model",)))


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
