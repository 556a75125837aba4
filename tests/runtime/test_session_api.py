"""The Session API as a hostile or careless caller drives it: values of the wrong type, shape or
size for add_prompt / push / remove, a closed session, an unbounded max_cond_frames, thousands
of one-click prompts for one object and frame: each is one InputError with one clear line,
never a ValueError/TypeError/IndexError from deeper down, and the session still works after."""

from __future__ import annotations

import numpy as np
import pytest

from fastsam2.runtime.errors import InputError

H, W = 240, 320


@pytest.fixture(scope="module")
def graphs(bundle_dir):
    from fastsam2.runtime.backends import open_backend
    from fastsam2.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    return bundle, open_backend("ort-cpu", bundle, None, warn=lambda m: None)


def session(graphs, **kw):
    from fastsam2.runtime.session import Session

    bundle, g = graphs
    return Session.open(bundle, graphs=g, keep=kw.pop("keep", 0.5), **kw)


def frame(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


BAD_PROMPTS = {
    "points as text": dict(points="abc"),
    "points as a number": dict(points=5),
    "three numbers": dict(points=[(1, 2, 3)]),
    "nested lists": dict(points=[[[1, 2]]]),
    "text coordinates": dict(points=[("a", "b")]),
    "NaN coordinate": dict(points=[(float("nan"), 1)]),
    "None coordinate": dict(points=[(None, 1)]),
    "array of 3 columns": dict(points=np.zeros((2, 3))),
    "negative points as a dict": dict(neg_points={"x": 1}),
    "box as text": dict(box="1,2,3,4"),
    "box of 3": dict(box=(1, 2, 3)),
    "box of None": dict(box=[None] * 4),
    "box with inf": dict(box=(0, 0, float("inf"), 5)),
    "mask as text": dict(mask="abc"),
    "ragged mask": dict(mask=[[1, 2], [3]]),
    "3-D mask": dict(mask=np.zeros((H, W, 3), bool)),
    "mask of strings": dict(mask=np.array([["a"]])),
    "text as a number": dict(text=5, points=[(1, 1)]),
    "text as a list": dict(text=["cyclist"]),
    "frame as text": dict(frame="1", points=[(1, 1)]),
    "frame as float": dict(frame=1.5, points=[(1, 1)]),
    "frame of 400 digits": dict(frame=10 ** 400, points=[(1, 1)]),
    "object id as text": dict(obj="1", points=[(1, 1)]),
    "object id as float": dict(obj=1.0, points=[(1, 1)]),
    "object id None": dict(obj=None, points=[(1, 1)]),
    "object id of 400 digits": dict(obj=10 ** 400, points=[(1, 1)]),
    "100 000 points": dict(points=[(1, 1)] * 100_000),
}


def one_line_input_error(fn):
    with pytest.raises(InputError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and 0 < len(msg) < 240, msg
    return msg


@pytest.mark.parametrize("pushed", [False, True], ids=["before-push", "after-push"])
def test_wrong_prompt_values_are_input_errors(graphs, pushed):
    with session(graphs) as s:
        if pushed:
            s.add_prompt(1, points=[(100, 100)])
            s.push(frame())
        for name, kw in BAD_PROMPTS.items():
            kw = dict(kw)
            obj = kw.pop("obj", 2)
            msg = one_line_input_error(lambda: s.add_prompt(obj, **kw))
            if name == "3-D mask":
                assert "2-D" in msg and "H x W" in msg, msg
        # nothing was scheduled by the refused prompts; the session goes on
        assert s._pending == {}
        s.add_prompt(2, points=[(50, 50)])
        r = s.push(frame(1))
        assert set(r.objects) == ({1, 2} if pushed else {2})


BAD_FRAMES = {
    "text": "abc", "None": None, "ragged": [[1, 2], [3]], "float32": np.zeros((H, W, 3), np.float32),
    "gray": np.zeros((H, W), np.uint8), "4 channels": np.zeros((H, W, 4), np.uint8), "1x1": np.zeros((1, 1, 3), np.uint8),
}


def test_wrong_frames_timestamps_and_removals_are_input_errors(graphs):
    with session(graphs) as s:
        s.add_prompt(1, points=[(100, 100)])
        for rgb in BAD_FRAMES.values():
            one_line_input_error(lambda: s.push(rgb))
        for ts in ("x", float("nan"), [1]):
            one_line_input_error(lambda: s.push(frame(), timestamp=ts))
        assert s.frame == -1
        s.push(frame())
        for kw in (dict(frame="x"), dict(frame=1.5), dict(frame=None, obj="a"), dict(frame=-3)):
            obj = kw.pop("obj", 1)
            one_line_input_error(lambda: s.remove(obj, **kw))
        s.remove(1)
        assert s.push(frame(1)).objects == {}


def test_a_closed_session_refuses_everything(graphs):
    s = session(graphs)
    s.add_prompt(1, points=[(100, 100)])
    s.push(frame())
    s.close()
    for call in (lambda: s.push(frame()), lambda: s.add_prompt(1, points=[(5, 5)]), lambda: s.remove(1)):
        assert "session is closed" in one_line_input_error(call)


@pytest.mark.parametrize("value", [0, -1, 65, 1_000_000, 99999999999999999999, True, 1.5, "4", None])
def test_max_cond_frames_is_bounded(graphs, value):
    from fastsam2.runtime.bank import MAX_COND_FRAMES

    assert MAX_COND_FRAMES == 64
    msg = one_line_input_error(lambda: session(graphs, max_cond_frames=value))
    assert "1..64" in msg


def test_max_cond_frames_at_the_bound_works(graphs):
    with session(graphs, max_cond_frames=64) as s:
        s.add_prompt(1, points=[(100, 100)])
        assert s.push(frame()).objects[1].prompted


def test_merged_one_click_prompts_are_capped(graphs):
    from fastsam2.runtime.prompts import MAX_PROMPT_POINTS, PromptSpec

    with session(graphs) as s:
        for i in range(MAX_PROMPT_POINTS):
            s.add_prompt(1, points=[(1 + i, 1)])
        msg = one_line_input_error(lambda: s.add_prompt(1, points=[(2, 2)]))
        assert f"at most {MAX_PROMPT_POINTS}" in msg
        # a box counts two clicks
        one_line_input_error(lambda: s.add_prompt(1, box=(1, 1, 5, 5)))
        assert len(s._pending[0][1].points) == MAX_PROMPT_POINTS
        r = s.push(frame())
        assert r.objects[1].prompted
    spec = PromptSpec(points=[(1.0, 1.0)] * MAX_PROMPT_POINTS)
    with pytest.raises(InputError, match=f"at most {MAX_PROMPT_POINTS}"):
        spec.merge(PromptSpec(points=[(2.0, 2.0)]), "object 1 on frame 0")
    assert len(spec.points) == MAX_PROMPT_POINTS  # a refused merge leaves the spec as it was


def test_messages_name_the_real_frame_and_the_real_problem(graphs):
    with session(graphs) as s:
        msg = one_line_input_error(lambda: s.add_prompt(1, frame=-1, points=[(5, 5)]))
        assert "no frame has been pushed yet" in msg and "correction needs a pushed frame" in msg, msg
        s.add_prompt(1, points=[(100, 100)])
        s.push(frame())
        msg = one_line_input_error(lambda: s.add_prompt(1, frame=0, box=(10, 10, 321, 241)))
        assert "321,241 is outside the 320x240 frame" in msg and "321x241" not in msg, msg
        msg = one_line_input_error(lambda: s.add_prompt(1, frame=0, points=[(320, 10)]))
        assert "outside the 320x240 frame" in msg, msg
        # a box's far corner may lie on the frame's edge (continuous coordinates)
        assert s.add_prompt(1, frame=0, box=(10, 10, 320, 240)).objects[1].prompted
        msg = one_line_input_error(lambda: s.add_prompt(2, mask=np.zeros((H, W, 3), bool)))
        assert "2-D" in msg and "(240, 320, 3)" in msg, msg
        msg = one_line_input_error(lambda: s.add_prompt(2, mask=np.zeros((100, 50), bool)))
        assert "50x100" in msg and "320x240" in msg, msg


def test_prompted_is_on_every_object_entry(graphs):
    with session(graphs) as s:
        s.add_prompt(1, points=[(100, 100)])
        first = s.push(frame()).to_json()
        s.add_prompt(2, points=[(200, 100)])
        second = s.push(frame(1)).to_json()
    assert first["objects"]["1"]["prompted"] is True
    assert second["objects"]["1"]["prompted"] is False and second["objects"]["2"]["prompted"] is True
