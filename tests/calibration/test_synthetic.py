"""Synthetic videos: deterministic, with ground truth that matches what is drawn."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastsam2.calibration.synthetic import main, make_davis_layout, make_video
from fastsam2.runtime.outputs import read_palette_png
from fastsam2.runtime.video import open_frames


def _frames(video):
    with open_frames(video.frames_dir_or_file) as src:
        return np.stack([rgb for _, rgb in src])


def _masks(video):
    return np.stack([video.read_mask(i) for i in range(video.num_frames)])


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("three"), num_frames=10, objects=3, seed=7,
                      distractors=2, occlusion=True)


def test_same_seed_same_video(tmp_path):
    a = make_video(tmp_path / "a", num_frames=5, seed=3, objects=2)
    b = make_video(tmp_path / "b", num_frames=5, seed=3, objects=2)
    c = make_video(tmp_path / "c", num_frames=5, seed=4, objects=2)
    assert np.array_equal(_frames(a), _frames(b))
    assert np.array_equal(_masks(a), _masks(b))
    assert a.first_frame_points == b.first_frame_points
    assert a.first_frame_boxes == b.first_frame_boxes
    assert not np.array_equal(_frames(a), _frames(c))


def test_layout_and_sizes(three):
    names = sorted(p.name for p in three.frames_dir_or_file.iterdir())
    assert names[:2] == ["00000.jpg", "00001.jpg"]
    assert len(list(three.masks.iterdir())) == three.num_frames == 10
    assert (three.height, three.width) == (240, 320)
    m = three.read_mask(0)
    assert m.shape == (240, 320) and m.dtype == np.uint8
    with Image.open(three.masks / "00000.png") as im:
        assert im.mode == "P"


def test_first_frame_masks_points_and_boxes(three):
    m0 = three.read_mask(0)
    assert set(np.unique(m0)) == {0, 1, 2, 3}  # distractors are background
    for obj_id in (1, 2, 3):
        obj = m0 == obj_id
        assert obj.sum() > 500
        x, y = three.first_frame_points[obj_id]
        # "Well inside": a 7x7 patch around the point is all object.
        assert obj[y - 3 : y + 4, x - 3 : x + 4].all()
        x0, y0, x1, y1 = three.first_frame_boxes[obj_id]
        ys, xs = np.nonzero(obj)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_objects_move_and_the_occluder_hides_them(tmp_path):
    kw = dict(num_frames=12, seed=1, objects=1, distractors=0)
    clear = _masks(make_video(tmp_path / "clear", **kw))
    hidden = _masks(make_video(tmp_path / "hidden", occlusion=True, **kw))
    centres = [np.argwhere(m == 1).mean(0) for m in clear]
    assert np.hypot(*(centres[-1] - centres[0])) > 3
    area_clear = (clear == 1).sum((1, 2))
    area_hidden = (hidden == 1).sum((1, 2))
    assert area_hidden[0] == area_clear[0]  # the bar enters after frame 0
    assert (area_hidden < area_clear).any()


def test_mp4_rejects_odd_size(tmp_path):
    with pytest.raises(ValueError, match="even"):
        make_video(tmp_path, size=(101, 120), fmt="mp4")


def test_davis_layout(tmp_path):
    seqs = {"bear": dict(num_frames=4, objects=2, seed=1), "car": dict(num_frames=3, seed=2)}
    out = make_davis_layout(tmp_path, seqs, split="val")
    assert (tmp_path / "ImageSets/2017/val.txt").read_text().split() == ["bear", "car"]
    for name, n in (("bear", 4), ("car", 3)):
        jpegs = tmp_path / "JPEGImages/480p" / name
        annots = tmp_path / "Annotations/480p" / name
        assert (jpegs / "00000.jpg").is_file() and (annots / "00000.png").is_file()
        assert len(list(jpegs.glob("*.jpg"))) == len(list(annots.glob("*.png"))) == n
        with open_frames(jpegs) as src:
            assert src.num_frames == n and src.frame_names[0] == "00000"
        assert out[name].num_frames == n
    ids = set(np.unique(read_palette_png(tmp_path / "Annotations/480p/bear/00000.png")))
    assert ids == {0, 1, 2}


def test_cli_prints_the_first_frame_point(tmp_path, capsys):
    assert main([str(tmp_path / "demo"), "--frames", "3", "--size", "96x64", "--mp4"]) == 0
    out = capsys.readouterr().out
    assert "object 1: point" in out
    with open_frames(tmp_path / "demo" / "video.mp4") as src:
        assert (src.num_frames, src.height, src.width) == (3, 64, 96)


def test_cli_size_is_width_x_height_in_and_out(tmp_path, capsys):
    """--size takes WIDTHxHEIGHT, as video tools do, and the summary prints the same order:
    what goes in comes back out (it took HxW and printed WxH)."""
    assert main([str(tmp_path / "v"), "--frames", "2", "--size", "160x64"]) == 0
    out = capsys.readouterr().out
    assert "(160x64: width x height)" in out
    with open_frames(tmp_path / "v" / "frames") as src:
        assert (src.width, src.height) == (160, 64)
    x, y = (int(v) for v in out.split("object 1: point ")[1].split()[0].split(","))
    assert 0 <= x < 160 and 0 <= y < 64  # the printed point is (x, y) in that frame
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "bad"), "--size", "640by480"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "WIDTHxHEIGHT" in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_cli_bad_count_is_one_line_and_writes_nothing(tmp_path, capsys):
    """A value make_video refuses is the user's: one `error:` line, exit 2, and no folder left
    behind (the counts are checked before the output folder is made)."""
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "zero"), "--frames", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: num_frames must be at least 1\n"
    assert not (tmp_path / "zero").exists()


def test_synthetic_and_runtime_io_do_not_import_torch():
    code = (
        "import sys, fastsam2.calibration.synthetic, fastsam2.runtime.video, "
        "fastsam2.runtime.outputs; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
