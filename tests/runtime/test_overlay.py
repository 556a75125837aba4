"""overlay.mp4 shows what the user gave and what came out: the clicks (positive, negative) and
boxes on the frames where they were given, and each object's id next to its mask, on top of the
tinted masks. Checked on arrays (the drawing functions), through the mp4 writer (decoded back),
and end to end through fastsam2-run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from click.testing import CliRunner

from fastsam2.runtime.outputs import (
    CLICK_COLOURS,
    DAVIS_PALETTE,
    OverlayWriter,
    _mark_sizes,
    blend_masks,
    draw_object_ids,
    draw_prompts,
    object_label_boxes,
    read_palette_png,
)
from fastsam2.runtime.run_cli import main
from fastsam2.runtime.video import open_frames


def near(rgb, x, y, r):
    """The pixels within r of (x, y)."""
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
    return rgb[(xx - x) ** 2 + (yy - y) ** 2 <= r * r]


def share_of(pixels, colour, tol=40) -> float:
    return float(np.mean(np.abs(pixels.astype(int) - colour).max(-1) <= tol))


def greenish(pixels) -> float:
    """Share of pixels where green dominates (a positive click after lossy coding)."""
    p = pixels.astype(int)
    return float(np.mean((p[:, 1] > p[:, 0] + 50) & (p[:, 1] > p[:, 2] + 50)))


def test_clicks_and_boxes_are_drawn_where_they_were_given():
    rgb = np.zeros((120, 160, 3), np.uint8)
    prompts = [{"object": 1, "points": [[40, 30]], "neg_points": [[100, 80]]},
               {"object": 2, "box": [10, 60, 70, 110]}]
    out = draw_prompts(rgb, prompts)
    r, _ = _mark_sizes(120, 160)
    assert share_of(near(out, 40, 30, r - 1), CLICK_COLOURS["points"]) > 0.5
    assert share_of(near(out, 100, 80, r - 1), CLICK_COLOURS["neg_points"]) > 0.5
    assert share_of(near(out, 40, 30, r - 1), CLICK_COLOURS["neg_points"]) == 0
    # the box's edges in object 2's palette colour, its inside and the rest untouched
    assert (out[60, 20:60] == DAVIS_PALETTE[2]).all() and (out[80:100, 10] == DAVIS_PALETTE[2]).all()
    assert (out[70:100, 20:60] == 0).all() and (out[:20, 100:] == 0).all()
    assert (rgb == 0).all()  # the input frame is not drawn on
    assert draw_prompts(rgb, []) is rgb and draw_prompts(rgb, None) is rgb


def test_text_start_point_is_drawn_as_a_click():
    rgb = np.zeros((120, 160, 3), np.uint8)
    out = draw_prompts(rgb, [{"object": 1, "text": "ball", "start": {"source": "text", "point": [80.0, 60.0]}}])
    assert share_of(near(out, 80, 60, _mark_sizes(120, 160)[0] - 1), CLICK_COLOURS["points"]) > 0.5


def test_each_object_id_is_written_next_to_its_mask():
    rgb = np.full((120, 160, 3), 90, np.uint8)
    mask = np.zeros((120, 160), np.uint8)
    mask[50:80, 60:100] = 1  # room above it: the label sits above the top-left corner
    mask[0:20, 0:30] = 3  # at the top edge: the label goes inside
    mask[110:, 150:] = 2  # at the right edge: the label is moved left, into the frame
    assert object_label_boxes(mask) == {1: [60, 50, 99, 79], 2: [150, 110, 159, 119], 3: [0, 0, 29, 19]}
    out = draw_object_ids(rgb, mask)
    _, size = _mark_sizes(120, 160)
    above_1 = out[50 - size:50, 60:60 + size]
    assert share_of(above_1.reshape(-1, 3), DAVIS_PALETTE[1], tol=0) > 0.3
    assert (above_1 > 200).all(-1).any()  # the digit, in white on the dark red label
    assert share_of(out[0:size, 0:size].reshape(-1, 3), DAVIS_PALETTE[3], tol=0) > 0.3
    assert share_of(out[110 - size:110, 160 - size:].reshape(-1, 3), DAVIS_PALETTE[2], tol=0) > 0.3
    assert (out[90:, :100] == 90).all()  # far from every mask: untouched
    assert draw_object_ids(rgb, np.zeros_like(mask)) is rgb


def test_overlay_mp4_shows_clicks_and_ids(tmp_path):
    """Through the encoder: the decoded frame has the click and the label, the next frame (no
    prompt on it) has the label only."""
    rgb = np.full((120, 160, 3), 90, np.uint8)
    mask = np.zeros((120, 160), np.uint8)
    mask[50:80, 60:100] = 1
    path = tmp_path / "overlay.mp4"
    with OverlayWriter(path, 160, 120, 24.0) as w:
        w.write(rgb, mask, [{"object": 1, "points": [[20, 100]]}])
        w.write(rgb, mask)
    with open_frames(path) as src:
        f0, f1 = [f.rgb for f in src.frames()]
    r, size = _mark_sizes(120, 160)
    assert greenish(near(f0, 20, 100, r - 1)) > 0.5
    assert greenish(near(f1, 20, 100, r - 1)) == 0 and share_of(near(f1, 20, 100, r - 1), (90, 90, 90), tol=10) == 1.0
    for f in (f0, f1):
        assert share_of(f[50 - size:50, 60:60 + size].reshape(-1, 3), DAVIS_PALETTE[1], tol=60) > 0.3


def test_overlay_writer_exception_leaves_nothing(tmp_path):
    rgb, mask = np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64), np.uint8)
    with pytest.raises(RuntimeError, match="boom"):
        with OverlayWriter(tmp_path / "overlay.mp4", 64, 48, 24.0) as w:
            w.write(rgb, mask)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_overlay_mp4_decodes_with_tinted_objects(tmp_path):
    from fastsam2.calibration.synthetic import make_video

    png = make_video(tmp_path / "png", num_frames=12, fmt="png", objects=2, occlusion=True)
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    out = tmp_path / "overlay.mp4"
    with open_frames(png.frames_dir_or_file) as src:
        # Odd size on purpose: the writer crops to even for yuv420p.
        with OverlayWriter(out, src.width - 1, src.height - 1, src.fps) as w:
            for i, rgb in src:
                w.write(rgb[:-1, :-1], png.read_mask(i)[:-1, :-1])
    assert os.listdir(tmp_path) == ["overlay.mp4"]
    assert w.codec in ("h264", "libx264", "mpeg4")
    with open_frames(out) as back:
        assert (back.num_frames, back.height, back.width) == (12, 238, 318)
        frames = [rgb for _, rgb in back]
    assert len(frames) == 12
    m0 = png.read_mask(0)[:238, :318]
    src0 = np.asarray(Image.open(png.frames_dir_or_file / "00000.png"))[:238, :318]
    expected = (src0.astype(np.float32) + DAVIS_PALETTE[m0]) / 2
    inside = m0 == 1
    got = frames[0][inside].astype(np.float32).mean(0)
    assert np.abs(got - expected[inside].mean(0)).max() < 8
    outside = m0 == 0
    assert np.abs(frames[0][outside].astype(np.float32).mean(0) - src0[outside].mean(0)).max() < 4


def _run_with_point(bundle_dir, tmp_path):
    from fastsam2.calibration.synthetic import make_video

    v = make_video(tmp_path / "v", num_frames=3, size=(120, 160), seed=5, fmt="png")
    x, y = v.first_frame_points[1]
    out = tmp_path / "r"
    res = CliRunner().invoke(main, [str(v.frames_dir_or_file), "--bundle", str(bundle_dir), "--point", f"{x},{y}",
                                    "--keep", "0.5", "--backend", "ort-cpu", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    with open_frames(out / "overlay.mp4") as src:
        overlay = [f.rgb for f in src.frames()]
    with open_frames(v.frames_dir_or_file) as src:
        frames = [f.rgb for f in src.frames()]
    masks = [read_palette_png(out / "masks" / f"{i:05d}.png") for i in range(3)]
    return (x, y), out, overlay, frames, masks


def test_run_overlay_labels_each_tracked_object(bundle_dir, tmp_path):
    _, out, overlay, frames, masks = _run_with_point(bundle_dir, tmp_path)
    for rgb, back, mask in zip(frames, overlay, masks):
        boxes = object_label_boxes(mask)
        if 1 not in boxes:
            continue
        x0, y0 = boxes[1][:2]
        plain = blend_masks(rgb, mask)
        labelled = draw_object_ids(plain, mask)
        changed = np.abs(labelled.astype(int) - plain).max(-1) > 60  # where the label is
        assert changed.sum() > 20
        # the decoded overlay has the label there, not the plain tinted frame
        assert np.abs(back[changed].astype(int) - labelled[changed]).mean() < 25
        assert np.abs(back[changed].astype(int) - plain[changed]).mean() > 60
    assert any(1 in object_label_boxes(m) for m in masks), "the prompted object was never tracked"


def test_run_overlay_shows_the_click_on_its_frame(bundle_dir, tmp_path):
    (x, y), out, overlay, frames, masks = _run_with_point(bundle_dir, tmp_path)
    assert json.loads((out / "results.json").read_text())["prompts"][0]["frame"] == 0
    r = _mark_sizes(120, 160)[0]
    assert greenish(near(overlay[0], x, y, r - 1)) > 0.5
    # against the same frame drawn without the click: frame 0 differs there, frame 1 does not
    off = [np.abs(near(overlay[i], x, y, r - 1).astype(int)
                  - near(draw_object_ids(blend_masks(frames[i], masks[i]), masks[i]), x, y, r - 1)).mean()
           for i in (0, 1)]
    assert off[0] > 40 and off[1] < 15, off
