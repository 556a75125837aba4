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
from fastsam2.runtime.errors import IncompleteInputError, InputError
from fastsam2.runtime.outputs import (
    DAVIS_PALETTE,
    atomic_write_bytes,
    atomic_write_json,
    read_palette_png,
    write_palette_png,
)
from fastsam2.runtime.video import Frame, open_frames

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


def test_frames_over_the_maximum_side_are_refused_before_decoding(tmp_path):
    # 4100x8: over MAX_INPUT_SIDE (4096) and still a tiny file; the size is read from the
    # header, so a huge frame costs nothing before it is refused
    _write_rgb(tmp_path / "0.png", 8, 4100, 0)
    with pytest.raises(InputError) as e:
        open_frames(tmp_path)
    assert str(e.value).startswith(f"frame {tmp_path / '0.png'} is 4100x8: over the 4096 px maximum side")
    # a later frame too (it would otherwise be decoded whole, then refused for its size)
    later = tmp_path / "later"
    later.mkdir()
    _write_rgb(later / "0.png", 8, 8, 0)
    _write_rgb(later / "1.png", 4100, 8, 0)
    with open_frames(later) as src, pytest.raises(InputError, match=r"1\.png is 8x4100: over the 4096"):
        list(src)


def test_video_over_the_maximum_side_is_refused(clip, monkeypatch):
    from fastsam2.runtime import frame_source

    monkeypatch.setattr(frame_source, "MAX_INPUT_SIDE", 300)  # the clip is 320x240
    _, mp4 = clip
    with pytest.raises(InputError) as e:
        open_frames(mp4.frames_dir_or_file)
    assert str(e.value).startswith(f"video {mp4.frames_dir_or_file} is 320x240: over the 300 px maximum side")
    monkeypatch.setattr(frame_source, "MAX_INPUT_SIDE", 320)  # the bound itself is accepted
    with open_frames(mp4.frames_dir_or_file) as src:
        assert (src.width, src.height) == (320, 240)


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


# --------------------------------------------------------------------- Frame API, stop, check_complete


def test_frames_api_on_files(clip):
    png, mp4 = clip
    for path in (png.frames_dir_or_file, mp4.frames_dir_or_file):
        with open_frames(path) as src:
            assert src.live is False and src.dropped == 0 and src.dropped_ranges == []
            frames = list(src.frames())
            src.check_complete()  # a complete file or folder: nothing to say
        assert all(isinstance(f, Frame) for f in frames)
        assert [f.index for f in frames] == list(range(12))
        # mp4: from pts (frame i at i/24 s); folder: index / fps
        assert np.allclose([f.timestamp for f in frames], np.arange(12) / 24.0, atol=1e-6)


def test_stop_ends_a_file_iteration(clip):
    _, mp4 = clip
    with open_frames(mp4.frames_dir_or_file) as src:
        got = []
        for i, _ in src:
            got.append(i)
            if i == 4:
                src.stop()
        assert got == [0, 1, 2, 3, 4]
        src.check_complete()  # stopped early: not read to the end, so nothing is claimed


def _write_video(path, n=24, fmt=None, options=None, size=(48, 64), shift=0):
    """n frames of noise (so that every frame is a packet of some size); shift > 0 moves every
    timestamp back by that many frames (mp4 then writes an edit list hiding those frames)."""
    h, w = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = 6
        for i in range(n):
            f = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), np.uint8), format="rgb24")
            f.pts = i - shift
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def _decode_all(path):
    with open_frames(path) as src:
        frames = [rgb.copy() for _, rgb in src]
        try:
            src.check_complete()
            error = None
        except IncompleteInputError as e:
            error = e
    return frames, error


def _packet_offsets(path):
    with av.open(str(path)) as c:
        return [p.pos for p in c.demux(video=0) if p.size]


@pytest.mark.parametrize("fmt, cut", [
    ("mp4", "mid-packet"),  # faststart: the index comes first, the cut takes frames away
    ("mp4", "at-packet"),  # ends exactly between two samples: no decoder error at all
    ("matroska", "mid-packet"),  # declares its duration, no frame count
])
def test_truncated_video_is_incomplete_after_its_good_frames(tmp_path, fmt, cut):
    ext = "mp4" if fmt == "mp4" else "mkv"
    opts = {"movflags": "faststart"} if fmt == "mp4" else {}
    intact = _write_video(tmp_path / f"intact.{ext}", fmt=fmt, options=opts)
    full, error = _decode_all(intact)
    assert len(full) == 24 and error is None
    data = intact.read_bytes()
    offsets = _packet_offsets(intact)
    end = offsets[18] if cut == "at-packet" else offsets[18] + 40
    cut_path = tmp_path / f"cut.{ext}"
    cut_path.write_bytes(data[:end])
    frames, error = _decode_all(cut_path)
    assert isinstance(error, IncompleteInputError) and error.exit_code == 3
    assert "cut short" in str(error) and str(cut_path) in str(error)
    # Every complete frame before the cut is handed out, and nothing else: the packet cut in
    # half is not decoded (a frame-threaded decoder fed it also lost the 2 good frames it had
    # in flight: 16 of 18 here), and none is garbage.
    assert len(frames) == 18
    assert all(np.array_equal(a, b) for a, b in zip(frames, full))
    assert "ended after 18 " in str(error)
    if fmt == "mp4":
        assert "18 of its 24 frames" in str(error)
    else:  # Matroska declares a duration for the whole file, not a frame count
        assert "at 0.75 s of its 1.00 s" in str(error)


def test_edit_list_mp4_is_complete(tmp_path):
    # A trimmed mp4 (an edit list hides the first 10 frames) has more samples than it shows:
    # comparing decoded frames with the sample count would call it truncated.
    path = _write_video(tmp_path / "trimmed.mp4", shift=10)
    with open_frames(path) as src:
        n = sum(1 for _ in src)
        assert src.num_frames == n == 14
        src.check_complete()


def test_stream_without_declared_length_is_not_judged(tmp_path):
    # MPEG-TS declares no length: a cut one cannot be told from a short one (documented).
    path = _write_video(tmp_path / "clip.ts", fmt="mpegts")
    cut = tmp_path / "cut.ts"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    frames, error = _decode_all(cut)
    assert 0 < len(frames) < 24 and error is None


def test_moov_at_end_mp4_cut_does_not_open(tmp_path):
    path = _write_video(tmp_path / "plain.mp4")  # the index (moov) is written last
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 9 // 10])
    with pytest.raises(InputError, match="cannot open video"):
        open_frames(cut)
