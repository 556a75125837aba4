"""Several objects in one fastsam2-run: prompt flags take an object id ("2:300,120"); each object
has its own memory bank, the image encoder runs once per frame, and the palette PNG gives a
pixel to the object with the highest positive logit.

The spine again, with two objects: at keep 1.0 each object's mask matches SAM2VideoPredictor
tracking the same two objects (same clicks), composed with the same rule.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import _silence
from fastsam2.runtime.outputs import read_palette_png
from fastsam2.runtime.run_cli import main


def run(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def two_objects(tmp_path_factory):
    from fastsam2.calibration.synthetic import make_video

    return make_video(tmp_path_factory.mktemp("two"), num_frames=10, size=(240, 320), seed=3,
                      objects=2, fmt="jpg")


def official_two(model, video):
    """SAM2VideoPredictor with one click on each object on frame 0: {frame: {obj: logits}}."""
    import torch

    _silence()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = model.init_state(str(video.frames_dir_or_file))
        for o in (1, 2):
            model.add_new_points_or_box(state, frame_idx=0, obj_id=o,
                                        points=np.array([video.first_frame_points[o]], np.float32),
                                        labels=np.array([1], np.int32))
        with torch.inference_mode():
            for fi, ids, masks in model.propagate_in_video(state):
                out[fi] = {int(o): masks[j, 0].float().numpy().copy() for j, o in enumerate(ids)}
    return out


def test_two_objects_match_the_official_predictor(tiny_sam2, bundle_dir, two_objects, tmp_path):
    v = two_objects
    (x1, y1), (x2, y2) = v.first_frame_points[1], v.first_frame_points[2]
    out = tmp_path / "r"
    code, text = run([v.frames_dir_or_file, "--bundle", bundle_dir, "--point", f"{x1},{y1}",
                      "--point", f"2:{x2},{y2}", "--keep", "1.0", "--backend", "ort-cpu",
                      "--out", out, "--quiet", "--no-overlay"])
    assert code == 0, text
    ref = official_two(tiny_sam2.model, v)
    res = json.loads((out / "results.json").read_text())
    assert res["objects"] == [1, 2] and len(res["frames"]) == 10
    for i, per_obj in ref.items():
        ours = read_palette_png(out / "masks" / f"{i:05d}.png")
        for o in (1, 2):
            # each object's own mask (results.json, before overlaps are resolved) is SAM2's
            own = per_obj[o] > 0
            rec = res["frames"][i]["objects"][str(o)]
            assert abs(rec["mask_area"] - int(own.sum())) <= 1e-3 * own.size, (i, o)
            ys, xs = np.nonzero(own)
            if len(xs):
                assert np.allclose(rec["bbox"], [xs.min(), ys.min(), xs.max(), ys.max()], atol=1), (i, o)
        # the composed PNG follows the official logits wherever they decide: background where
        # both are negative, the larger one where they differ. Random weights make the two
        # objects' logits tie (to 1e-7) on many foreground pixels, which may go either way.
        stack = np.stack([per_obj[1], per_obj[2]])
        want = np.where(stack.max(0) > 0, np.argmax(stack, 0) + 1, 0)
        top = stack.max(0)
        decided = (top < -1e-4) | ((top > 1e-4) & (np.abs(stack[0] - stack[1]) > 1e-4))
        assert decided.mean() > 0.5, (i, decided.mean())
        assert np.array_equal(ours[decided], want[decided]), i
    assert all(set(f["objects"]) == {"1", "2"} for f in res["frames"])
    assert [(p["object"], p["frame"], "start" in p) for p in res["prompts"]] == [(1, 0, False), (2, 0, False)]


def test_mixed_text_and_click_objects_and_encoder_runs_once(bundle_dir, two_objects, tmp_path):
    v = two_objects
    x2, y2 = v.first_frame_points[2]
    out = tmp_path / "r"
    code, text = run([v.frames_dir_or_file, "--bundle", bundle_dir, "--prompt", "red ball",
                      "--prompt", "2:cyclist", "--point", f"2:{x2},{y2}", "--keep", "0.5",
                      "--backend", "ort-cpu", "--out", out, "--quiet", "--max-frames", "4"])
    assert code == 0, text
    res = json.loads((out / "results.json").read_text())
    starts = {p["object"]: p for p in res["prompts"]}
    assert starts[1]["start"]["source"] == "text" and starts[1]["text"] == "red ball"
    assert "start" not in starts[2] and starts[2]["text"] == "cyclist" and starts[2]["points"]
    for f in res["frames"][1:]:
        assert {o["kept_tokens"] for o in f["objects"].values()} == {128}
    ids = {int(x) for i in range(4) for x in np.unique(read_palette_png(out / "masks" / f"{i:05d}.png"))}
    assert ids <= {0, 1, 2}


@pytest.mark.parametrize("args, message", [
    (["--point", "2:10,10", "--point", "300:5,5"], "object id 300 is not valid: ids are integers 1..254"),
    (["--box", "2:1,1,20,20", "--box", "2:2,2,30,30"], "object 2 has two --box values"),
    (["--prompt", "cyclist", "--prompt", "1:red ball"], "object 1 has two --prompt values"),
    (["--point", "10,10", "--prompt", "2:no such prompt"], "'no such prompt' is not in the bundle"),
])
def test_bad_object_prompts_are_one_line(bundle_dir, two_objects, tmp_path, args, message):
    code, text = run([two_objects.frames_dir_or_file, "--bundle", bundle_dir, *args,
                      "--out", tmp_path / "r", "--quiet"])
    assert code == 2 and message in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_compose_objects_rule():
    from fastsam2.runtime.sam2_math import compose_objects

    logits = np.array([[[1.0, -1.0, 0.5, -2.0]], [[0.5, 2.0, 0.7, -0.1]]], np.float32)  # [2, 1, 4]
    assert compose_objects(logits, [3, 7]).tolist() == [[3, 7, 7, 0]]
    assert compose_objects(logits[:1], [5]).tolist() == [[5, 0, 5, 0]]
    assert compose_objects(logits, [3, 7]).dtype == np.uint8
