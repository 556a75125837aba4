"""J and F against hand-computed cases, and the official DAVIS quirks we reproduce on purpose."""

import numpy as np
import pytest

from fastsam2.calibration.davis import (
    binary_dilation,
    bound_pixels,
    db_eval_boundary,
    db_eval_iou,
    db_statistics,
    disk,
    evaluate_sequence,
    seg2bmap,
)
from fastsam2.runtime.errors import InputError


def square(shape, top, left, size):
    m = np.zeros(shape, dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


# ---------------------------------------------------------------------------- J


def test_iou_both_empty_is_one():
    empty = np.zeros((20, 20), dtype=bool)
    assert db_eval_iou(empty, empty) == 1.0


def test_iou_one_empty_is_zero():
    empty = np.zeros((20, 20), dtype=bool)
    full = square((20, 20), 2, 2, 5)
    assert db_eval_iou(full, empty) == 0.0
    assert db_eval_iou(empty, full) == 0.0


def test_iou_of_squares_offset_by_half():
    # 10x10 squares 5 px apart: 50 px shared, 150 px covered
    a = square((30, 30), 5, 5, 10)
    b = square((30, 30), 5, 10, 10)
    assert db_eval_iou(a, b) == pytest.approx(50 / 150)


def test_iou_ignores_void_pixels():
    gt = square((30, 30), 5, 5, 10)
    res = gt.copy()
    res[20:25, 20:25] = True  # a false positive...
    void = np.zeros_like(gt)
    void[18:28, 18:28] = True  # ...entirely inside the void band
    assert db_eval_iou(gt, res) == pytest.approx(100 / 125)
    assert db_eval_iou(gt, res, void) == 1.0
    # a frame whose only content is void counts as both-empty
    assert db_eval_iou(void, void, void) == 1.0


def test_iou_takes_a_stack_of_frames():
    a = np.stack([square((20, 20), 0, 0, 4), np.zeros((20, 20), bool)])
    b = np.stack([square((20, 20), 0, 2, 4), np.zeros((20, 20), bool)])
    np.testing.assert_allclose(db_eval_iou(a, b), [8 / 24, 1.0])


# ---------------------------------------------------------------------------- F


def test_tolerance_is_a_fraction_of_the_diagonal():
    assert bound_pixels((100, 100)) == 2  # ceil(0.008 * 141.4) = ceil(1.13)
    assert bound_pixels((480, 854)) == 8  # DAVIS 480p: ceil(7.84)
    assert bound_pixels((100, 100), bound_th=3) == 3  # >= 1 means pixels


def test_disk_is_skimage_disk():
    assert disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disk(2).sum() == 13
    assert disk(8).shape == (17, 17)


def test_seg2bmap_marks_the_pixel_before_the_edge():
    # a 1-pixel object has a 2x2 boundary up-left of it, never the image border
    seg = np.zeros((10, 10), bool)
    seg[4, 6] = True
    assert sorted(zip(*np.nonzero(seg2bmap(seg)))) == [(3, 5), (3, 6), (4, 5), (4, 6)]
    # in the bottom-right corner the pixel itself drops out (the official b[-1, -1] = 0)
    corner = np.zeros((10, 10), bool)
    corner[9, 9] = True
    assert sorted(zip(*np.nonzero(seg2bmap(corner)))) == [(8, 8), (8, 9), (9, 8)]


def test_dilation_matches_a_brute_force_disk():
    rng = np.random.default_rng(0)
    for radius in (1, 2, 5, 8):
        mask = rng.random((23, 31)) < 0.02
        mask[0, 0] = mask[-1, -1] = True  # edges of the image
        want = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            yy, xx = np.mgrid[:23, :31]
            want |= (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
        np.testing.assert_array_equal(binary_dilation(mask, disk(radius)), want)


def test_dilation_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    mask = rng.random((60, 80)) < 0.05
    for radius in (2, 8):
        np.testing.assert_array_equal(binary_dilation(mask, disk(radius)),
                                      ndimage.binary_dilation(mask, disk(radius)))


def test_f_of_identical_masks_is_one():
    m = square((50, 50), 10, 12, 20)
    assert db_eval_boundary(m, m) == 1.0


def test_f_empty_cases():
    empty = np.zeros((50, 50), bool)
    m = square((50, 50), 10, 10, 5)
    assert db_eval_boundary(empty, empty) == 1.0
    assert db_eval_boundary(m, empty) == 0.0  # precision 1, recall 0
    assert db_eval_boundary(empty, m) == 0.0  # precision 0, recall 1


def half_shifted_edge(shift):
    """GT: left half of a 100x100 image. Result: the same, bottom half's edge moved right."""
    gt = np.zeros((100, 100), bool)
    gt[:, :50] = True
    res = np.zeros((100, 100), bool)
    res[:50, :50] = True
    res[50:, :50 + shift] = True
    return gt, res


def test_f_edge_shift_within_tolerance_is_one():
    gt, res = half_shifted_edge(2)  # tolerance on 100x100 is 2 px
    assert db_eval_boundary(gt, res) == 1.0
    assert db_eval_iou(gt, res) < 1.0  # J sees the shift, F forgives it


def test_f_edge_shift_beyond_tolerance_by_hand():
    gt, res = half_shifted_edge(3)
    # GT boundary: column 49, 100 px. Result boundary: column 49 in rows 0-48 (49 px),
    # the step in row 49 at columns 49-52 (4 px), column 52 in rows 50-99 (50 px): 103 px.
    # Within 2 px of column 49: 49 + 3 (columns 49, 50, 51 of the step) -> precision 52/103.
    # GT pixels within the disk of the result boundary: rows 0-49, plus rows 50 and 51
    # (1 and 2 px below (49, 49)) -> recall 52/100.  F = 2*52 / (103 + 100).
    assert seg2bmap(res).sum() == 103
    assert db_eval_boundary(gt, res) == pytest.approx(104 / 203)


def test_one_pixel_masks():
    a = np.zeros((100, 100), bool)
    a[10, 10] = True
    assert db_eval_iou(a, a) == 1.0
    assert db_eval_boundary(a, a) == 1.0
    b = np.zeros((100, 100), bool)
    b[10, 13] = True
    # boundaries are the 2x2 blocks at columns 9-10 and 12-13: one column of each is 2 px
    # from the other block (matched), the other 3 px (not): P = R = 2/4
    assert db_eval_iou(a, b) == 0.0
    assert db_eval_boundary(a, b) == pytest.approx(0.5)


def test_f_ignores_void_pixels():
    gt = square((50, 50), 10, 10, 10)
    res = gt.copy()
    res[30:40, 30:40] = True
    void = np.zeros_like(gt)
    void[28:42, 28:42] = True
    assert db_eval_boundary(gt, res) < 1.0
    assert db_eval_boundary(gt, res, void) == 1.0


def test_f_takes_a_stack_of_frames():
    gt, res = half_shifted_edge(3)
    f = db_eval_boundary(np.stack([gt, gt]), np.stack([gt, res]))
    np.testing.assert_allclose(f, [1.0, 104 / 203])


# ---------------------------------------------------------------------------- statistics


def test_statistics_on_a_crafted_series():
    values = [1, 1, 0, 0, 0, 0, 0, 0.3]
    mean, recall, decay = db_statistics(values)
    assert mean == pytest.approx(2.3 / 8)
    assert recall == pytest.approx(2 / 8)
    # official bins for 8 frames are [0:3], [2:5], [4:6], [5:8] -- they share edge frames, so
    # this is mean(1, 1, 0) - mean(0, 0, 0.3), not np.array_split's mean(1, 1) - mean(0, 0.3)
    assert decay == pytest.approx(2 / 3 - 0.1)


def test_recall_counts_strictly_above_half():
    assert db_statistics([0.5, 0.51, 0.2, 0.9])[1] == pytest.approx(0.5)


def test_statistics_of_a_single_frame():
    assert db_statistics([0.7]) == pytest.approx((0.7, 1.0, 0.0))


# ---------------------------------------------------------------------------- sequences


def make_sequence(n_frames=6, shape=(40, 60)):
    """Two objects drifting right; object ids 1 and 2."""
    frames = []
    for t in range(n_frames):
        m = np.zeros(shape, np.uint8)
        m[5:15, 5 + t:20 + t] = 1
        m[22:35, 30 + t:45 + t] = 2
        frames.append(m)
    return frames


def test_first_and_last_frames_are_not_scored():
    gt = make_sequence()
    res = [m.copy() for m in gt]
    res[1][5:15, 5:8] = 0  # one real error in a scored frame
    base = evaluate_sequence(gt, res)
    garbage = [m.copy() for m in res]
    garbage[0][:] = 2
    garbage[-1][:] = 0
    again = evaluate_sequence(gt, garbage)
    assert len(base[1]["J"]) == len(gt) - 2
    for obj in (1, 2):
        for key in ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"):
            assert again[obj][key] == base[obj][key]
    # and they need not exist at all
    assert evaluate_sequence(gt, [None] + res[1:-1] + [None])[1]["J-Mean"] == base[1]["J-Mean"]
    assert base[1]["J-Mean"] < 1.0 and base[2]["J-Mean"] == 1.0


def test_objects_come_from_the_first_annotation_and_void_is_background():
    gt = make_sequence()
    for m in gt[1:]:
        m[0:3, 0:3] = 3  # appears after the first frame: not an object to score
        m[36:40, 0:10] = 255  # void
    res = [np.where(m == 255, 1, np.where(m == 3, 0, m)) for m in gt]
    scores = evaluate_sequence(gt, res)
    assert sorted(scores) == [1, 2]
    # official semi-supervised scoring folds void into background: painting it is an error
    assert scores[1]["J-Mean"] < 1.0
    assert scores[2]["J-Mean"] == 1.0


def test_result_ids_beyond_the_annotation_are_an_error():
    gt = make_sequence()
    res = [m.copy() for m in gt]
    res[2][0, 0] = 3
    with pytest.raises(InputError, match="object id 3"):
        evaluate_sequence(gt, res)


def test_missing_middle_frame_is_an_error():
    gt = make_sequence()
    res = [m.copy() for m in gt]
    res[2] = None
    with pytest.raises(InputError, match="missing"):
        evaluate_sequence(gt, res)
