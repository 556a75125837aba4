"""Objects as the batch (runtime/batched.py) against the per-object path: the same session,
the same prompts, every object's logits on every frame within float32 rounding, the same kept
tokens. The scenario has what makes objects differ: a late object, a text prompt, a correction
on a tracked frame, a removal, and keep 1.0 / 0.5 / auto (the router batched or skipped).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

# measured on the test model, 256 px, 8 frames, 3 objects: max-abs logits batched vs one by
# one 3.7e-7 (keep 1.0), 3.1e-7 (0.5), 3.7e-7 (auto); the bound is ~10x that
ATOL = 4e-6


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    from fastsam2.runtime.synthetic import make_video

    v = make_video(tmp_path_factory.mktemp("three"), num_frames=8, size=(240, 320), seed=5, objects=3)
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(v.frames_dir_or_file.glob("*.jpg"))]
    return v, frames


@pytest.fixture(scope="module")
def graphs(bundle_dir):
    from fastsam2.runtime.backends import open_backend
    from fastsam2.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    return bundle, open_backend("ort-cpu", bundle, None, warn=lambda m: None)


class Counting:
    """A graph session that records the batch of every call (feat's first axis)."""

    def __init__(self, inner, calls: list):
        self.inner, self.calls = inner, calls

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, feeds):
        key = "prev_mask_logits" if "prev_mask_logits" in feeds else "mask_logits" if "mask_logits" in feeds else "feat"
        self.calls.append(int(feeds[key].shape[0]))
        return self.inner.run(feeds)


def track(graphs, video, keep, batch: bool, calls: list | None = None):
    from fastsam2.runtime.session import Session

    bundle, (name, sessions) = graphs
    if calls is not None:
        sessions = {g: (Counting(s, calls) if g == "mask_decoder" else s) for g, s in sessions.items()}
    v, frames = video
    pts = v.first_frame_points
    out = []
    with Session.open(bundle, keep=keep, graphs=(name, sessions), batch_objects=batch) as s:
        s.add_prompt(1, points=[pts[1]])
        s.add_prompt(2, points=[pts[2]], text="cyclist")
        s.add_prompt(3, frame=2, points=[pts[3]])
        s.remove(2, frame=7)
        for i, rgb in enumerate(frames):
            r = s.push(rgb)
            if i == 4:  # a correction of object 1 on a tracked frame
                x, y = pts[1]
                r = s.add_prompt(1, frame=4, points=[(x + 3, y + 2)])
            out.append({o: (r.objects[o].logits.copy(), r.objects[o].kept_tokens) for o in r.objects})
    return out


@pytest.mark.parametrize("keep", [1.0, 0.5, "auto"])
def test_batched_equals_per_object(graphs, three, keep):
    one = track(graphs, three, keep, batch=False)
    calls = []
    both = track(graphs, three, keep, batch=True, calls=calls)
    assert max(calls) == 3 and calls.count(3) >= 2, f"the decoder never ran three objects at once: {calls}"
    assert [sorted(f) for f in one] == [sorted(f) for f in both]
    worst = 0.0
    for f, (a, b) in enumerate(zip(one, both)):
        for o in a:
            assert a[o][1] == b[o][1], f"frame {f} object {o}: kept tokens {a[o][1]} vs {b[o][1]}"
            worst = max(worst, float(np.abs(a[o][0] - b[o][0]).max()))
    print(f"keep {keep}: max-abs batched vs one by one {worst:.2e}")
    assert worst <= ATOL
    assert sorted(one[6]) == [1, 2, 3] and sorted(one[7]) == [1, 3]


def test_old_bundle_runs_objects_one_by_one(graphs, tmp_path):
    """A bundle exported before the batch axis (batch fixed at 1) still loads, unbatched."""
    from fastsam2.runtime.batched import bundle_batchable
    from fastsam2.runtime.errors import BundleError
    from fastsam2.runtime.manifest_schema import validate_manifest

    bundle, _ = graphs
    assert bundle_batchable(bundle.manifest)
    old = fixed_batch(bundle.manifest, 1)
    validate_manifest(old)
    assert not bundle_batchable(old)
    with pytest.raises(BundleError, match="graphs.router.inputs do not match the graph contract"):
        validate_manifest(fixed_batch(bundle.manifest, 2))


def fixed_batch(manifest: dict, batch: int) -> dict:
    """The manifest as an export before the batch axis wrote it: B fixed at `batch`."""
    m = json.loads(json.dumps(manifest))
    for entry in m["graphs"].values():
        for t in entry["inputs"] + entry["outputs"]:
            t["shape"] = [batch if d == "B" else d for d in t["shape"]]
        if "dynamic" in entry:
            entry["dynamic"] = [d for d in entry["dynamic"] if d != "B"]
    return m


def test_sessions_batch_by_default_where_the_bundle_can(graphs):
    from fastsam2.runtime.session import Session

    bundle, g = graphs
    assert Session.open(bundle, graphs=g).batch_objects
    assert not Session.open(bundle, graphs=g, batch_objects=False).batch_objects


def test_openvino_runs_batches_of_any_size(bundle_dir):
    """OpenVINO's CPU plugin fused the memory encoder's broadcast sum and then refused every
    call after the first batch of another size (export/graphs/memory_encoder.py)."""
    pytest.importorskip("openvino")
    from fastsam2.export.onnx_export import example_feeds
    from fastsam2.runtime.backends import create_sessions
    from fastsam2.runtime.bundle import load_bundle
    from fastsam2.runtime.contract import geometry

    bundle = load_bundle(bundle_dir)
    sessions = create_sessions(bundle, "openvino", 1, precision="fp32", warn=lambda m: None)
    geom = geometry(bundle.manifest["image_size"])
    for g in ("memory_encoder", "mask_decoder", "router"):
        for b in (1, 2, 1, 3):
            out = sessions[g].run(example_feeds(g, geom, batch=b, points=1, seed=b))
            assert all(v.shape[0] == b for v in out.values()), g
