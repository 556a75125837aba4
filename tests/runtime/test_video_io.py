"""Frame sources and output writers: what users feed in and what they get back."""

from __future__ import annotations

import gc
import json
import os
import tracemalloc
import weakref

import av
import numpy as np
import pytest
from PIL import Image

from fastsam2.calibration.synthetic import make_video
from fastsam2.runtime.errors import InputError
from fastsam2.runtime.outputs import (
    DAVIS_PALETTE,
    OverlayWriter,
    atomic_write_bytes,
    atomic_write_json,
    read_palette_png,
    write_palette_png,
)
from fastsam2.runtime.video import open_frames

# Measured on this synthetic video with PyAV 18 / libx264 crf 18: mean |mp4 - source| is
# about 6 grey levels, almost all of it the per-pixel colour noise that yuv420p chroma
# subsampling cannot keep. 10 leaves headroom for the mpeg4 fallback without hiding a
# wrong colour order or a shifted frame (those give 40+).
MP4_MEAN_ABS_DIFF_BOUND = 10.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The same 12 frames as a lossless PNG folder and as an mp4."""
    root = tmp_path_factory.mktemp("clip")
    png = make_video(root / "png", num_frames=12, fmt="png", objects=2, occlusion=True)
    mp4 = make_video(root / "mp4", num_frames=12, fmt="mp4", objects=2, occlusion=True)
    return png, mp4


def _write_rgb(path, h, w, value):
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def test_folder_order_is_natural_and_frames_are_rgb(tmp_path):
    for name, value in [("10.jpg", 30), ("2.JPG", 20), ("1.png", 10), ("notes.txt", 0)]:
        if name.endswith(".txt"):
            (tmp_path / name).write_text("not a frame")
        else:
            _write_rgb(tmp_path / name, 16, 24, value)
    with open_frames(tmp_path) as src:
        assert (src.kind, src.num_frames, src.height, src.width) == ("folder", 3, 16, 24)
        assert src.fps == 24.0
        assert src.frame_names == ["1", "2", "10"]
        frames = list(src)
    assert [i for i, _ in frames] == [0, 1, 2]
    for (_, rgb), value in zip(frames, (10, 20, 30)):
        assert rgb.dtype == np.uint8 and rgb.shape == (16, 24, 3) and rgb.flags.c_contiguous
        assert abs(int(rgb.mean()) - value) <= 2


def test_greyscale_and_rgba_frames_become_rgb(tmp_path):
    Image.new("L", (8, 8), 50).save(tmp_path / "0.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "1.png")
    with open_frames(tmp_path) as src:
        shapes = [rgb.shape for _, rgb in src]
    assert shapes == [(8, 8, 3), (8, 8, 3)]


def test_mp4_round_trip(clip):
    png, mp4 = clip
    with open_frames(mp4.frames_dir_or_file) as src:
        assert (src.kind, src.num_frames, src.height, src.width) == ("video", 12, 240, 320)
        assert src.fps == pytest.approx(24.0)
        diffs = []
        for i, rgb in src:
            assert rgb.dtype == np.uint8 and rgb.shape == (240, 320, 3) and rgb.flags.c_contiguous
            ref = np.asarray(Image.open(png.frames_dir_or_file / f"{i:05d}.png"))
            diffs.append(np.abs(rgb.astype(np.int16) - ref).mean())
    assert len(diffs) == 12
    assert max(diffs) < MP4_MEAN_ABS_DIFF_BOUND


def test_video_can_be_iterated_twice(clip):
    _, mp4 = clip
    with open_frames(mp4.frames_dir_or_file) as src:
        first = [rgb[0, 0].copy() for _, rgb in src]
        second = [rgb[0, 0].copy() for _, rgb in src]
    assert len(first) == len(second) == 12
    assert np.array_equal(np.array(first), np.array(second))


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_frames(tmp_path / "nope.mp4")


@pytest.mark.parametrize("content", [[], ["readme.txt"]])
def test_folder_without_images(tmp_path, content):
    for name in content:
        (tmp_path / name).write_text("x")
    with pytest.raises(InputError, match="no .jpg"):
        open_frames(tmp_path)


def test_corrupt_video(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="x.mp4"):
        open_frames(bad)


def test_single_image_is_not_a_video(tmp_path):
    _write_rgb(tmp_path / "a.jpg", 8, 8, 0)
    with pytest.raises(InputError, match="single image"):
        open_frames(tmp_path / "a.jpg")


def _empty_video(path, fmt):
    # A container whose header is written but which never receives a packet.
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("mpeg4", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()


def test_zero_frame_video(tmp_path):
    path = tmp_path / "empty.avi"
    _empty_video(path, "avi")  # avi keeps the stream header, so this is a stream with 0 frames
    with pytest.raises(InputError, match="no decodable frames"):
        open_frames(path)


def test_video_without_video_stream(tmp_path):
    path = tmp_path / "empty.mp4"
    _empty_video(path, "mp4")  # mp4 drops a track with no samples
    with pytest.raises(InputError, match="no video stream"):
        open_frames(path)


def test_corrupt_image_in_folder(tmp_path):
    _write_rgb(tmp_path / "0.jpg", 8, 8, 0)
    (tmp_path / "1.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with open_frames(tmp_path) as src:
        with pytest.raises(InputError, match="1.jpg"):
            list(src)


def test_mixed_size_folder_names_the_file(tmp_path):
    _write_rgb(tmp_path / "0.jpg", 8, 8, 0)
    _write_rgb(tmp_path / "1.jpg", 8, 8, 0)
    _write_rgb(tmp_path / "2.jpg", 10, 8, 0)
    with open_frames(tmp_path) as src:
        with pytest.raises(InputError, match=r"2\.jpg is 8x10"):
            list(src)


def test_duplicate_stems_rejected(tmp_path):
    _write_rgb(tmp_path / "0.jpg", 8, 8, 0)
    _write_rgb(tmp_path / "0.png", 8, 8, 0)
    with pytest.raises(InputError, match="share the name"):
        open_frames(tmp_path)


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    kw = dict(num_frames=300, size=(120, 160), distractors=0)
    return make_video(root / "mp4", fmt="mp4", **kw), make_video(root / "jpg", fmt="jpg", **kw)


@pytest.mark.parametrize("which", [0, 1], ids=["mp4", "folder"])
def test_iterating_long_video_keeps_no_frames(long_videos, which):
    video = long_videos[which]
    frame_bytes = 120 * 160 * 3
    alive = []
    tracemalloc.start()
    try:
        with open_frames(video.frames_dir_or_file) as src:
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            count = 0
            for _, rgb in src:
                alive.append(weakref.ref(rgb))
                count += 1
                del rgb
            peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    gc.collect()
    assert count == 300
    # All 300 frames are 17 MB; a source that kept copies would blow this. PyAV's arrays are
    # views on decoder buffers that tracemalloc cannot see, hence the weakref check as well.
    assert peak < 10 * frame_bytes, peak
    assert sum(r() is not None for r in alive) == 0


def test_palette_png_round_trip(tmp_path):
    assert DAVIS_PALETTE.shape == (256, 3)
    assert DAVIS_PALETTE[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert DAVIS_PALETTE[255].tolist() == [224, 224, 192]  # the VOC "void" colour
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:10], mask[12:20, 20:30], mask[25:, :] = 1, 2, 3
    mask[0, 0] = 255
    path = tmp_path / "00000.png"
    write_palette_png(path, mask)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert im.getpalette()[3:12] == [128, 0, 0, 0, 128, 0, 128, 128, 0]
    back = read_palette_png(path)
    assert back.dtype == np.uint8 and np.array_equal(back, mask)


def test_read_palette_png_rejects_rgb(tmp_path):
    _write_rgb(tmp_path / "m.png", 4, 4, 1)
    with pytest.raises(InputError, match="palette"):
        read_palette_png(tmp_path / "m.png")


def test_atomic_writes_leave_only_the_file(tmp_path):
    atomic_write_json(tmp_path / "meta.json", {"b": 1, "a": [1, 2]})
    atomic_write_bytes(tmp_path / "blob.bin", b"abc")
    atomic_write_bytes(tmp_path / "blob.bin", b"xyz")  # replacing an existing file
    assert sorted(os.listdir(tmp_path)) == ["blob.bin", "meta.json"]
    assert (tmp_path / "blob.bin").read_bytes() == b"xyz"
    text = (tmp_path / "meta.json").read_text()
    assert json.loads(text) == {"b": 1, "a": [1, 2]} and text.index('"b"') < text.index('"a"')
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "bad.bin", "not bytes")
    assert sorted(os.listdir(tmp_path)) == ["blob.bin", "meta.json"]


def test_overlay_writer_exception_leaves_nothing(tmp_path):
    rgb, mask = np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64), np.uint8)
    with pytest.raises(RuntimeError, match="boom"):
        with OverlayWriter(tmp_path / "overlay.mp4", 64, 48, 24.0) as w:
            w.write(rgb, mask)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_overlay_mp4_decodes_with_tinted_objects(tmp_path, clip):
    png, _ = clip
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
