"""bench/precision.py's rows (issue 23): object counts in one run, each row against the official
predictor with the same objects, batched rows where Session.open takes batch_objects, --configs."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import precision  # noqa: E402
import precision_runs  # noqa: E402


def test_objects_takes_a_count_or_a_list():
    assert precision_runs.parse_objects("8") == [8]
    assert precision_runs.parse_objects("4,1,2,8,2") == [1, 2, 4, 8]
    for bad in ("0", "1,x", ""):
        with pytest.raises(ValueError, match="--objects"):
            precision_runs.parse_objects(bad)


def test_bad_objects_is_one_error_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        precision.main(["--objects", "1,zero", "--no-docs"])
    assert e.value.code == 2
    assert "error: --objects takes counts" in capsys.readouterr().err


def test_config_names_and_prefixes_field_by_field():
    name = precision_runs.config_name("ort-cpu+openvino", "picked", 0.3, 8, True, several=True)
    assert name == "ort-cpu+openvino:picked:keep0.3:obj8:batched"
    assert precision_runs.config_name("ort-cpu", "fp32", 1.0, 1, False, several=False) == "ort-cpu:fp32:keep1"
    pick = precision_runs.parse_prefixes("ort-cpu+openvino:picked, ort-cpu:fp32:keep1")
    assert precision_runs.selected(name, pick)
    assert precision_runs.selected("ort-cpu:fp32:keep1:obj2", pick)
    assert not precision_runs.selected("ort-cpu:fp32:keep0.3:obj2", pick)
    assert not precision_runs.selected("ort-cpu:int8:keep1", precision_runs.parse_prefixes("ort-cpu+openvino"))
    assert precision_runs.selected("anything", precision_runs.parse_prefixes(None))
    star = precision_runs.parse_prefixes("*:picked:keep0.3")
    assert precision_runs.selected("ort-cpu+openvino:picked:keep0.3:obj8:batched", star)
    assert precision_runs.selected("ort-cpu:picked:keep0.3", star)
    assert not precision_runs.selected("ort-cpu:fp32:keep0.3", star)
    assert not precision_runs.selected("ort-cpu", precision_runs.parse_prefixes("ort-cpu:fp32"))


class Fake:
    def __init__(self, *a, batched=False, **kw):
        self.batched = batched


@pytest.fixture
def fake_trackers(monkeypatch):
    monkeypatch.setattr(precision, "Ours", Fake)
    monkeypatch.setattr(precision, "Official", Fake)


def runs_for(counts, configs=None, batch=True, monkeypatch=None):
    monkeypatch.setattr(precision, "why_not_batched", lambda m: None if batch else "no batch_objects parameter")
    args = SimpleNamespace(frames=9, configs=configs)
    rows = {("ort-cpu", "fp32"): (None, {}, []), ("ort-cpu+openvino", "picked"): (None, {}, [])}
    videos = {n: SimpleNamespace(frames_dir_or_file=f"v{n}") for n in counts}
    skipped = {}
    runs = precision.make_runs(args, SimpleNamespace(manifest={}), rows, [1.0, 0.3], counts, {n: {} for n in counts}, videos,
                               precision_runs.parse_prefixes(configs), skipped, lambda m: None)
    return runs, skipped


def test_one_official_per_count_and_batched_rows_beside_per_object(fake_trackers, monkeypatch):
    runs, skipped = runs_for([1, 2], monkeypatch=monkeypatch)
    official = [n for n, (s, _) in runs.items() if s["backend"] == "official"]
    assert official == ["official:obj1", "official:obj2"]
    assert "ort-cpu:fp32:keep0.3:obj1" in runs and "ort-cpu:fp32:keep0.3:obj2" in runs
    batched = sorted(n for n, (s, _) in runs.items() if s["batched"])
    assert batched == ["ort-cpu+openvino:picked:keep0.3:obj2:batched", "ort-cpu+openvino:picked:keep1:obj2:batched",
                       "ort-cpu:fp32:keep0.3:obj2:batched", "ort-cpu:fp32:keep1:obj2:batched"]
    assert all(runs[n][1].batched for n in batched) and "batched" not in skipped
    assert len(runs) == 2 + 2 * 2 * 2 + 4


def test_without_batch_objects_the_batched_rows_are_skipped_with_the_reason(fake_trackers, monkeypatch):
    runs, skipped = runs_for([1, 8], batch=False, monkeypatch=monkeypatch)
    assert not any(s["batched"] for s, _ in runs.values())
    assert "batch_objects" in skipped["batched"]
    _, skipped = runs_for([1], batch=False, monkeypatch=monkeypatch)
    assert "batched" not in skipped  # one object: nothing to batch


def test_batched_rows_need_batch_objects_and_a_bundle_with_the_batch_axis(monkeypatch):
    monkeypatch.setattr(precision_runs, "batch_objects_supported", lambda: False)
    assert "no batch_objects parameter" in precision_runs.why_not_batched({})
    monkeypatch.setattr(precision_runs, "batch_objects_supported", lambda: True)
    pytest.importorskip("fastsam2.runtime.batched")
    graphs = ("router", "mask_decoder", "memory_encoder")
    old = {"graphs": {g: {"outputs": [{"shape": [1, 4]}]} for g in graphs}}
    assert "no objects batch axis" in precision_runs.why_not_batched(old)
    assert precision_runs.why_not_batched({"graphs": {g: {"outputs": [{"shape": ["B", 4]}]} for g in graphs}}) is None


def test_one_count_keeps_the_names_it_always_had(fake_trackers, monkeypatch):
    runs, _ = runs_for([1], monkeypatch=monkeypatch)
    assert sorted(runs) == ["official", "ort-cpu+openvino:picked:keep0.3", "ort-cpu+openvino:picked:keep1",
                            "ort-cpu:fp32:keep0.3", "ort-cpu:fp32:keep1"]


def test_configs_limits_the_rows(fake_trackers, monkeypatch, capsys):
    runs, _ = runs_for([1, 8], configs="ort-cpu+openvino:picked:keep0.3", monkeypatch=monkeypatch)
    assert sorted(runs) == ["official:obj1", "official:obj8", "ort-cpu+openvino:picked:keep0.3:obj1",
                            "ort-cpu+openvino:picked:keep0.3:obj8", "ort-cpu+openvino:picked:keep0.3:obj8:batched"]
    with pytest.raises(SystemExit) as e:
        runs_for([1], configs="tensorrt", monkeypatch=monkeypatch)
    assert e.value.code == 2 and "selects no row" in capsys.readouterr().err


def test_each_row_is_compared_with_the_official_predictor_of_its_own_count():
    spec = lambda b, p, k, n, batched=False: ({"backend": b, "precision": p, "keep": k, "objects": n,  # noqa: E731
                                              "batched": batched}, None)
    runs = {"official:obj1": spec("official", "fp32 (PyTorch)", None, 1),
            "official:obj2": spec("official", "fp32 (PyTorch)", None, 2),
            "ort-cpu:fp32:keep1:obj1": spec("ort-cpu", "fp32", 1.0, 1),
            "ort-cpu:fp32:keep1:obj2": spec("ort-cpu", "fp32", 1.0, 2),
            "ort-cpu:fp32:keep1:obj2:batched": spec("ort-cpu", "fp32", 1.0, 2, True)}
    ms = {"official:obj1": 1000.0, "official:obj2": 2000.0, "ort-cpu:fp32:keep1:obj1": 500.0,
          "ort-cpu:fp32:keep1:obj2": 800.0, "ort-cpu:fp32:keep1:obj2:batched": 400.0}
    frames = 9
    frame_ms = {n: [v] * frames for n, v in ms.items()}
    stages = {n: [{"image_encoder": 1.0}] * frames for n in runs}
    one, two = np.zeros((1, 4, 4), bool), np.zeros((2, 4, 4), bool)
    one[0, :2], two[:, :2] = True, True
    half = two.copy()
    half[1, :, :] = False
    half[1, 0] = True  # object 2: 4 of 8 pixels -> IoU 0.5, mean over objects 0.75
    masks = {"official:obj1": [one] * frames, "official:obj2": [two] * frames, "ort-cpu:fp32:keep1:obj1": [one] * frames,
             "ort-cpu:fp32:keep1:obj2": [two] * frames, "ort-cpu:fp32:keep1:obj2:batched": [half] * frames}
    rows = {("ort-cpu", "fp32"): (None, {"image_encoder": "fp32"}, [])}
    table = {r["config"]: r for r in precision.make_table(runs, rows, frame_ms, stages, masks)}
    assert table["ort-cpu:fp32:keep1:obj1"]["x_official"] == 2.0
    assert table["ort-cpu:fp32:keep1:obj2"]["x_official"] == 2.5  # vs the 2-object official, not the 1-object one
    b = table["ort-cpu:fp32:keep1:obj2:batched"]
    assert (b["x_official"], b["objects"], b["batched"], b["keep"]) == (5.0, 2, True, "1")
    assert b["iou_vs_official"] == {"mean": 0.75, "min": 0.75}
    assert b["iou_vs_ort_fp32_same_keep"] == {"mean": 0.75, "min": 0.75}
    assert b["iou_vs_per_object"] == {"mean": 0.75, "min": 0.75}
    assert table["official:obj2"]["objects"] == 2 and table["official:obj2"]["keep"] is None
    assert "iou_vs_per_object" not in table["ort-cpu:fp32:keep1:obj2"]


class Steps:
    """A tracker stand-in: masks of its object count; raises at frame `fail_at`."""

    def __init__(self, objects, fail_at=None):
        self.objects, self.fail_at = objects, fail_at

    def step(self, i, rgb):
        if i == self.fail_at:
            raise RuntimeError("Exception from src/plugins:\n  shape {1, 256} is incompatible with {2, 256}")
        assert rgb.shape == (self.objects,)  # each run gets the frame of its own video
        return np.ones((self.objects, 2, 2), bool), {"image_encoder": 1.0}


@pytest.fixture
def fake_frames(monkeypatch):
    import contextlib

    import fastsam2.runtime.video as video

    @contextlib.contextmanager
    def open_frames(path):
        yield ((i, np.zeros(int(path[1:]))) for i in range(4))  # "v2": frames of shape (2,)

    monkeypatch.setattr(video, "open_frames", open_frames)
    return {n: SimpleNamespace(frames_dir_or_file=f"v{n}") for n in (1, 2)}


def test_a_row_that_fails_leaves_the_loop_with_its_error(fake_frames):
    spec = lambda b, n: {"backend": b, "objects": n}  # noqa: E731
    runs = {"official:obj1": (spec("official", 1), Steps(1)), "official:obj2": (spec("official", 2), Steps(2)),
            "a:obj2": (spec("ort-cpu", 2), Steps(2)), "b:obj2:batched": (spec("openvino", 2), Steps(2, fail_at=2))}
    skipped = {}
    (frame_ms, stages, masks), load = precision.lockstep(runs, fake_frames, skipped, lambda m: None)
    assert sorted(runs) == sorted(frame_ms) == ["a:obj2", "official:obj1", "official:obj2"]
    assert len(masks["a:obj2"]) == 4 and len(load) == 4
    assert skipped["b:obj2:batched"].startswith("failed at frame 2: RuntimeError: Exception from src/plugins: shape")
    runs = {"official:obj1": (spec("official", 1), Steps(1, fail_at=1))}
    with pytest.raises(RuntimeError):  # the reference itself failing is a broken run, not a row
        precision.lockstep(runs, fake_frames, {}, lambda m: None)
