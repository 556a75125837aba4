"""J&F on the DAVIS 2017 semi-supervised benchmark, numpy and pillow only.

The numbers must match davisvideochallenge/davis2017-evaluation (the code behind every published
DAVIS J&F), so the quirks of that code are reproduced on purpose and marked "official" below.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastsam2.runtime.errors import InputError, OutputError
from fastsam2.runtime.metrics import mask_iou

VOID_LABEL = 255
RESOLUTION = "480p"
GLOBAL_COLUMNS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
SEQUENCE_COLUMNS = ["Sequence", "J-Mean", "F-Mean"]


# ---------------------------------------------------------------------------- region (J)


def db_eval_iou(annotation, segmentation, void_pixels=None):
    """Jaccard index of two binary masks (..., H, W); pixels marked void count for neither set;
    official: an empty union (both masks empty) is a perfect score, not 0/0."""
    return mask_iou(annotation, segmentation, void_pixels)


# ---------------------------------------------------------------------------- boundary (F)


def seg2bmap(seg):
    """1-pixel-wide boundary of a binary mask, offset half a pixel towards the origin.

    official (Martin's BSDS seg2bmap): a pixel is on the boundary when it differs from its east,
    south or south-east neighbour; the last row only looks east, the last column only south, and
    the image border itself is never a boundary.
    """
    seg = np.asarray(seg).astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius):
    """skimage.morphology.disk, which the official code uses: x^2 + y^2 <= r^2 on an r-centred grid."""
    axis = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(axis, axis)
    return (x**2 + y**2) <= radius**2


def binary_dilation(mask, kernel):
    """cv2.dilate(mask, kernel) for binary images, with nothing outside the image.

    Done one kernel row at a time: a row of a convex kernel is one run of columns, and "any pixel
    in this run" is a difference of running sums, so a radius-8 disk costs ~25 array passes
    instead of ~200 shifted copies.
    """
    mask = np.asarray(mask).astype(bool)
    kernel = np.asarray(kernel).astype(bool)
    h, w = mask.shape
    kh, kw = kernel.shape
    ay, ax = kh // 2, kw // 2  # cv2's default anchor
    pad = kw
    padded = np.zeros((h, w + 2 * pad), dtype=np.int32)
    padded[:, pad:pad + w] = mask
    csum = np.zeros((h, w + 2 * pad + 1), dtype=np.int32)
    np.cumsum(padded, axis=1, out=csum[:, 1:])
    runs_cache: dict[tuple[int, int], np.ndarray] = {}
    out = np.zeros_like(mask)
    for i in range(kh):
        cols = np.flatnonzero(kernel[i])
        if cols.size == 0:
            continue
        # split the row into contiguous runs (a disk row is one run; any kernel works)
        breaks = np.flatnonzero(np.diff(cols) > 1)
        starts = np.concatenate([[cols[0]], cols[breaks + 1]]) - ax
        ends = np.concatenate([cols[breaks], [cols[-1]]]) - ax
        dy = i - ay
        if abs(dy) >= h:
            continue
        for a, b in zip(starts.tolist(), ends.tolist()):
            hit = runs_cache.get((a, b))
            if hit is None:
                # dst[y, x] = any(src[y, x + a .. x + b]), cv2's (unreflected) convention
                hit = (csum[:, pad + b + 1:pad + b + 1 + w] - csum[:, pad + a:pad + a + w]) > 0
                runs_cache[(a, b)] = hit
            if dy >= 0:
                out[:h - dy] |= hit[dy:]
            else:
                out[-dy:] |= hit[:h + dy]
    return out


def bound_pixels(shape, bound_th=0.008):
    """Boundary tolerance in pixels: bound_th itself if >= 1, else a fraction of the diagonal."""
    # np.linalg.norm, not math.hypot: the last bit can decide the ceil, so compute it officially
    return bound_th if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm(shape[:2])))


def f_measure(foreground_mask, gt_mask, void_pixels=None, bound_th=0.008):
    """Boundary F of one frame: precision/recall of boundary pixels matched within the tolerance."""
    foreground_mask = np.asarray(foreground_mask).astype(bool)
    gt_mask = np.asarray(gt_mask).astype(bool)
    if void_pixels is not None:
        keep = ~np.asarray(void_pixels).astype(bool)
        foreground_mask = foreground_mask & keep
        gt_mask = gt_mask & keep
    fg_boundary = seg2bmap(foreground_mask)
    gt_boundary = seg2bmap(gt_mask)
    n_fg = int(fg_boundary.sum())
    n_gt = int(gt_boundary.sum())
    # official special cases: an empty boundary "predicts nothing wrong" (precision 1) and
    # "misses nothing" when there is nothing to find (recall 1)
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0  # precision or recall is 0, so F = 0
    selem = disk(bound_pixels(foreground_mask.shape, bound_th))
    fg_dil = binary_dilation(fg_boundary, selem)
    gt_dil = binary_dilation(gt_boundary, selem)
    precision = np.sum(fg_boundary & gt_dil) / n_fg
    recall = np.sum(gt_boundary & fg_dil) / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def db_eval_boundary(annotation, segmentation, void_pixels=None, bound_th=0.008):
    """Boundary F of one frame (H, W) -> float, or of frames (T, H, W) -> array of T."""
    annotation = np.asarray(annotation)
    segmentation = np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ")
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, void_pixels, bound_th)
    if annotation.ndim != 3:
        raise ValueError(f"db_eval_boundary takes (H, W) or (T, H, W), not {annotation.shape}")
    voids = [None] * len(annotation) if void_pixels is None else void_pixels
    return np.array([f_measure(s, a, v, bound_th) for a, s, v in zip(annotation, segmentation, voids)])


# ---------------------------------------------------------------------------- statistics


def db_statistics(per_frame_values):
    """(Mean, Recall, Decay) of one object's per-frame J or F, as the official utils.db_statistics."""
    values = np.asarray(per_frame_values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(values) if values.size and not np.all(np.isnan(values)) else np.nan
        recall = np.mean(values > 0.5) if values.size else np.nan  # NaN counts as a miss
    # official: 5 edges on 1..N rounded half-up (the 1e-10), and each bin *includes* its right
    # edge, so neighbouring bins share a frame -- not np.array_split. (The official code stores
    # the edges as uint8, which wraps past 255 frames; DAVIS never gets there, we use int.)
    edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    bins = [values[edges[i]:edges[i + 1] + 1] for i in range(4)]
    decay = _nanmean(bins[0]) - _nanmean(bins[3])
    return float(mean), float(recall), float(decay)


def _nanmean(x):
    return np.nan if x.size == 0 or np.all(np.isnan(x)) else np.nanmean(x)


def evaluate_sequence(gt_masks, res_masks, bound_th=0.008):
    """Score one sequence: {object id: {"J": per-frame, "F": per-frame, "J-Mean", ..., "F-Decay"}}.

    gt_masks and res_masks are index maps (pixel = object id) for every frame of the sequence.
    The first frame (the given annotation) and the last are not scored, as officially; their
    res_masks entries may be None. Objects are 1..max id of the first annotation; 255 (void) is
    background, and res ids the annotation lacks are an error.
    """
    gt = [np.asarray(m) for m in gt_masks]
    if len(gt) != len(res_masks):
        raise InputError(f"{len(res_masks)} result frames for {len(gt)} annotated frames")
    if len(gt) < 3:
        raise InputError(f"{len(gt)} frames: J&F needs 3 or more (first and last are not scored)")
    # official (semi-supervised): void is folded into background and no void mask is passed
    # to J/F, so the 255 band around objects counts against false positives.
    gt = [np.where(m == VOID_LABEL, 0, m) for m in gt]
    n_objects = int(gt[0].max())
    gt_mid = np.stack(gt[1:-1])
    res_mid = []
    for t, r in enumerate(res_masks[1:-1], start=1):
        if r is None:
            raise InputError(f"result frame {t} is missing")
        r = np.asarray(r)
        if r.shape != gt_mid.shape[1:]:
            raise InputError(f"result frame {t} is {r.shape[1]}x{r.shape[0]}, "
                             f"the annotation is {gt_mid.shape[2]}x{gt_mid.shape[1]}")
        res_mid.append(r)
    res_mid = np.stack(res_mid)
    top = int(res_mid.max())
    if top > n_objects:
        raise InputError(f"results hold object id {top}, the first annotation only has {n_objects}")
    scores = {}
    for obj in range(1, n_objects + 1):
        j = db_eval_iou(gt_mid == obj, res_mid == obj)
        f = db_eval_boundary(gt_mid == obj, res_mid == obj, bound_th=bound_th)
        j_stats, f_stats = db_statistics(j), db_statistics(f)
        scores[obj] = {"J": j, "F": f}
        scores[obj].update(zip(["J-Mean", "J-Recall", "J-Decay"], j_stats))
        scores[obj].update(zip(["F-Mean", "F-Recall", "F-Decay"], f_stats))
    return scores


# ---------------------------------------------------------------------------- DAVIS layout


def read_index_png(path):
    """Pixel indices of a palette (or greyscale) PNG, as the official np.array(Image.open(p))."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "1"):
                raise InputError(f"{path} is a {im.mode} image, not an indexed (palette) PNG")
            return np.array(im).astype(np.uint8)
    except FileNotFoundError:
        raise InputError(f"missing mask {path}") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from None


def list_sequences(davis_root, split):
    """Sequence names of ImageSets/2017/<split>.txt, after checking the DAVIS folder is usable."""
    root = Path(davis_root)
    if not root.is_dir():
        raise InputError(f"DAVIS folder not found: {root}")
    split_file = root / "ImageSets" / "2017" / f"{split}.txt"
    if not split_file.is_file():
        raise InputError(f"split file not found: {split_file}")
    if not (root / "Annotations" / RESOLUTION).is_dir():
        raise InputError(f"annotations not found: {root / 'Annotations' / RESOLUTION}")
    names = [line.strip() for line in split_file.read_text().splitlines()]
    return [n for n in names if n]


def sequence_files(davis_root, seq):
    """(frame jpgs, annotation pngs) of one sequence, sorted; every frame must be annotated."""
    root = Path(davis_root)
    images = sorted((root / "JPEGImages" / RESOLUTION / seq).glob("*.jpg"))
    annotations = sorted((root / "Annotations" / RESOLUTION / seq).glob("*.png"))
    if not images:
        raise InputError(f"no frames for sequence {seq} in {root / 'JPEGImages' / RESOLUTION / seq}")
    if len(annotations) != len(images):
        raise InputError(f"sequence {seq}: {len(annotations)} annotations for {len(images)} frames; "
                         "J&F needs every frame annotated (train/val splits)")
    return images, annotations


def evaluate_davis(davis_root, results_dir, split="val", sequences=None):
    """Score <results_dir>/<seq>/<frame>.png against DAVIS; returns (global row, per-object rows)."""
    names = list_sequences(davis_root, split)
    if sequences is not None:
        names = list(sequences)  # official: an explicit list replaces the split's
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise InputError(f"results folder not found: {results_dir}")
    per_object = []  # (name, scores) in sequence then object order, as the official dict
    for seq in names:
        _, annotations = sequence_files(davis_root, seq)
        gt = [read_index_png(p) for p in annotations]
        res = [None] * len(gt)
        for t in range(1, len(gt) - 1):
            # results are matched by the annotation's file name, not by position
            path = results_dir / seq / f"{annotations[t].stem}.png"
            if not path.is_file():
                raise InputError(f"missing result {path} (need one palette PNG per annotated frame)")
            res[t] = read_index_png(path)
        try:
            scores = evaluate_sequence(gt, res)
        except InputError as e:
            raise InputError(f"sequence {seq}: {e}") from None
        per_object += [(f"{seq}_{obj}", s) for obj, s in scores.items()]

    def mean(key):
        vals = [s[key] for _, s in per_object]
        return float(np.mean(vals)) if vals else float("nan")

    # official: J&F is the mean over *objects* (not sequences) of J-Mean and F-Mean, averaged
    global_row = {k: mean(k) for k in GLOBAL_COLUMNS[1:]}
    global_row = {"J&F-Mean": (global_row["J-Mean"] + global_row["F-Mean"]) / 2, **global_row}
    per_seq_rows = [{"Sequence": n, "J-Mean": s["J-Mean"], "F-Mean": s["F-Mean"]} for n, s in per_object]
    return global_row, per_seq_rows


def _fmt(v):
    if isinstance(v, str):
        return v
    # pandas.to_csv(float_format="%.3f") writes NaN as an empty field
    return "" if v is None or math.isnan(v) else "%.3f" % v


def write_result_csvs(results_dir, split, global_row, per_seq_rows):
    """Write global_results-<split>.csv and per-sequence_results-<split>.csv as the official script."""
    results_dir = Path(results_dir)
    paths = (results_dir / f"global_results-{split}.csv",
             results_dir / f"per-sequence_results-{split}.csv")
    tables = ((GLOBAL_COLUMNS, [global_row]), (SEQUENCE_COLUMNS, per_seq_rows))
    for path, (columns, rows) in zip(paths, tables):
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            # pandas writes "\n" line ends and minimal quoting; csv's default is "\r\n"
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(columns)
                writer.writerows([_fmt(row[c]) for c in columns] for row in rows)
            os.replace(tmp, path)  # never leave half a CSV behind
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return paths


def format_global_table(global_row):
    """The global row as a two-line, right-aligned text table (what pandas' to_string prints)."""
    cells = [_fmt(global_row[c]) for c in GLOBAL_COLUMNS]
    widths = [max(len(c), len(v)) for c, v in zip(GLOBAL_COLUMNS, cells)]
    header = " ".join(c.rjust(w) for c, w in zip(GLOBAL_COLUMNS, widths))
    values = " ".join(v.rjust(w) for v, w in zip(cells, widths))
    return f"{header}\n{values}"
