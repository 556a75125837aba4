"""Shared fixtures: the test model (a seeded random-init SAM2.1 hiera-t adjusted so every path
moves the logits: tests/sam2_test_model.py) at 256 px, synthetic videos, the official
SAM2VideoPredictor's masks on them, and one bundle exported from the test model's weights
(computed once per session).

No checkpoint can be downloaded here; the test model is the real architecture, so every
parity statement holds for the official weights too (same code path, other numbers).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from pathlib import Path

from fastsam2.runtime.metrics import mask_iou  # noqa: F401 (the tests' IoU is the project's one)


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh: -n 2), each worker runs on its own share of the CPUs,
    so the threads of its graph runtimes (and of the processes it starts, which inherit the
    mask) never compete with the other worker's."""
    global THREADS
    from fastsam2.runtime.backends import default_threads

    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker and count and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= int(count) > 1:
            os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw"))::int(count)])
    THREADS = min(2, default_threads())
    # caches (OpenVINO's compiled models, ORT-TensorRT engines) go to a folder of this run, not
    # the user's ~/.cache; tests of the cache location set their own
    import atexit
    import shutil
    import tempfile

    cache = tempfile.mkdtemp(prefix="fastsam2-test-cache-")
    atexit.register(shutil.rmtree, cache, True)
    os.environ["XDG_CACHE_HOME"] = cache


# test files whose session fixtures are costly and shared: one xdist worker runs them together
# (scripts/test.sh: --dist loadgroup; every other file is a group of its own)
_GROUPS = {"test_mutations.py": "scenarios", "test_session_parity.py": "scenarios"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(_GROUPS.get(name, str(item.path.relative_to(config.rootpath)))))


TINY = 256  # image size for the default suite (the architecture allows any multiple of 16)
# threads for graph sessions in tests: 2, or fewer where this process may use fewer CPUs (set
# by pytest_configure, after an xdist worker is pinned)
THREADS = 2
NUM_FRAMES = 9  # past num_maskmem = 7: the bank fills (frame 7) and its oldest entry drops (frame 8)


def _silence():
    warnings.filterwarnings("ignore", message=".*random init.*")
    warnings.filterwarnings("ignore", message=".*Skipping the post-processing.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="sam2")


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    torch.set_num_threads(THREADS)
    return torch


def load_tiny(image_size=TINY, seed=0):
    """The test model at `image_size` (SAM2VideoPredictor)."""
    from sam2_test_model import load_test_model

    _silence()
    return load_test_model(image_size=image_size, seed=seed)


_CHECKPOINTS = {}


def model_checkpoint(seed=0) -> str:
    """The test model's weights (seed 0) as a checkpoint file, written once per session: export
    loads it through --checkpoint, so bundles hold the test model too."""
    import atexit
    import shutil
    import tempfile

    from sam2_test_model import save_checkpoint

    if seed not in _CHECKPOINTS:
        folder = tempfile.mkdtemp(prefix="fastsam2-test-ckpt-")
        atexit.register(shutil.rmtree, folder, True)
        _CHECKPOINTS[seed] = save_checkpoint(load_tiny(TINY, seed), f"{folder}/test_model.pt")
    return _CHECKPOINTS[seed]



@pytest.fixture(scope="session")
def tiny_sam2(torch_threads):
    return load_tiny()


@pytest.fixture(scope="session")
def pruned(tiny_sam2):
    from fastsam2.export.model import PrunedSAM2

    return PrunedSAM2(tiny_sam2)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    from fastsam2.calibration.synthetic import make_video

    return make_video(tmp_path_factory.mktemp("synth"), num_frames=NUM_FRAMES, size=(240, 320),
                      seed=0, fmt="jpg")


@pytest.fixture(scope="session")
def stream_video(tmp_path_factory):
    """10 frames, two objects: the streaming-session scenarios' video."""
    from fastsam2.calibration.synthetic import make_video

    return make_video(tmp_path_factory.mktemp("stream"), num_frames=10, size=(240, 320), seed=4,
                      objects=2, fmt="jpg")


@pytest.fixture(scope="session")
def scenarios(tiny_sam2, stream_video, tmp_path_factory):
    """The streaming scenarios (tests/runtime/official_stream.py) with SAM2's output on each,
    computed on first use and shared by the session parity tests and the mutation check."""
    from official_stream import Scenarios

    return Scenarios(tiny_sam2, stream_video, tmp_path_factory.mktemp("scenarios"))


@pytest.fixture(scope="session")
def official_correction(scenarios):
    """(steps, SAM2's output) of the correction scenario: a prompt on frame 5."""
    return scenarios.steps("correction"), scenarios.reference("correction")


def run_official(predictor, frames_dir, point, obj_id=1):
    """SAM2VideoPredictor on a frames folder with one positive click on frame 0.

    Returns {frame: video-resolution mask logits}. Hole filling needs sam2's CUDA extension;
    without it sam2 skips that step itself, which is the comparison point we want.
    """
    import torch

    _silence()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = predictor.init_state(str(frames_dir))
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id,
                                        points=np.array([point], np.float32),
                                        labels=np.array([1], np.int32))
        out = {}
        with torch.inference_mode():
            for fi, _, masks in predictor.propagate_in_video(state):
                out[fi] = masks[0, 0].float().numpy().copy()
    return out


@pytest.fixture(scope="session")
def official_logits(tiny_sam2, synth):
    return run_official(tiny_sam2.model, synth.frames_dir_or_file, synth.first_frame_points[1])




def export_tiny_bundle(out, target="cpu", keep=1.0, prompts="cyclist,red ball", checkpoint="test",
                       image_size=TINY, force=False, router_weights=None, precision="fp32"):
    """fastsam2-export's library function at the test size, offline (random CLIP). The default
    checkpoint is the test model's (checkpoint=None: the exporter's own seeded random init); the
    graphs stay fp32 (the parity tests are exact; tests/export/test_precision.py covers int8)."""
    from fastsam2.export.cli import export_bundle

    _silence()
    if checkpoint == "test":
        checkpoint = model_checkpoint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_bundle(config="sam2.1_hiera_t", checkpoint=checkpoint, target=target, keep=keep,
                             prompts=prompts, text_pretrained="random", image_size=image_size,
                             out=str(out), force=force, router_weights=router_weights,
                             precision=precision)


def own_bundle(bundle_dir, dst) -> Path:
    """The session bundle is shared: hard-link its files into a folder a test may write into (a
    symlink would point outside the bundle, which the runtime refuses; the manifest is replaced,
    never written through)."""
    import os
    import shutil

    shutil.copytree(bundle_dir, dst, copy_function=os.link)
    return Path(dst)


def retarget_bundle(bundle_dir, dst, target, keep=0.5) -> dict:
    """The session's bundle as `fastsam2-export --target TARGET --keep KEEP` would have written it,
    without exporting the graphs again (they do not depend on the target): its files hard-linked
    into `dst`, then export's own engines step (engines built where the target's GPU is this
    machine's, the build plan otherwise) and the keep fields, resealed. Returns the manifest.
    Used where a test needs a TensorRT target's bundle and not the export itself
    (tests/export/test_export_cli.py exports for TensorRT targets end to end)."""
    import json

    from fastsam2.export.engines_step import engines_step
    from fastsam2.profiles import load_profile
    from fastsam2.export.onnx_export import keep_fields
    from fastsam2.runtime.bundle import reseal

    dst = own_bundle(bundle_dir, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m.update(target=target, **keep_fields(keep, m["token_grid"][0] * m["token_grid"][1], m["model"]))
    m["engines"] = engines_step(load_profile(target), keep)(dst, m) or {}
    (dst / "manifest.json").unlink()  # a hard link into the session's bundle: replace, never write through
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return reseal(dst)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, torch_threads):
    """A cpu-target bundle of the test model at 256 px, keep 1.0, prompts 'cyclist' and
    'red ball' (built once)."""
    out = tmp_path_factory.mktemp("bundle") / "b"
    export_tiny_bundle(out)
    return out
