"""`track(...)`: the library behind fastsam2-run. Frames in, masks + overlay + results.json out.

Frames are decoded and processed one at a time (memory is flat in video length); every mask
PNG is written atomically as soon as its frame is done, so an interrupted run leaves only
complete files.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastsam2.runtime.backends import open_backend, pick_backend
from fastsam2.runtime.bundle import load_bundle
from fastsam2.runtime.errors import InputError
from fastsam2.runtime.sam2_math import Resizer, compose_objects, mask_area_bbox
from fastsam2.runtime.tracker import Prompt, Tracker

UNTRAINED_ROUTER = ("the bundle's router is untrained: its text term is noise, so pruning and "
                    "text-only starts rely on visual and uncertainty cues only")
RANDOM_TEXT = "the bundle's text embeddings come from a randomly initialised CLIP: they carry no meaning"
RANDOM_WEIGHTS = "the bundle was exported from randomly initialised SAM2 weights: masks are not meaningful"


@dataclass
class PromptSpec:
    text: str | None = None
    points: list = field(default_factory=list)  # [(x, y)] positive, input pixels
    neg_points: list = field(default_factory=list)
    box: tuple | None = None  # (x0, y0, x1, y1) input pixels


def _check_inside(xy, w, h, what):
    x, y = xy
    if not (0 <= x < w and 0 <= y < h):
        raise InputError(f"{what} {x:g},{y:g} is outside the {w}x{h} frame")


def model_prompt(spec: PromptSpec, w: int, h: int, S: int) -> Prompt | None:
    """Input-pixel prompt -> SAM2 model coordinates (add_new_points_or_box's normalisation).

    A box goes first as two points labelled 2 and 3, as SAM2 does.
    """
    pts, labels = [], []
    if spec.box is not None:
        x0, y0, x1, y1 = spec.box
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"box {x0:g},{y0:g},{x1:g},{y1:g} must have x0 < x1 and y0 < y1")
        _check_inside((x0, y0), w, h, "box corner")
        _check_inside((x1, y1), w + 1, h + 1, "box corner")
        pts += [(x0, y0), (x1, y1)]
        labels += [2, 3]
    for p in spec.points:
        _check_inside(p, w, h, "point")
        pts.append(p)
        labels.append(1)
    for p in spec.neg_points:
        _check_inside(p, w, h, "negative point")
        pts.append(p)
        labels.append(0)
    if not pts:
        return None
    xy = np.asarray(pts, np.float32) / np.asarray([w, h], np.float32) * np.float32(S)
    return Prompt(xy.astype(np.float32), np.asarray(labels, np.float32))


def text_start_point(tracker: Tracker, enc: dict, w: int, h: int):
    """Search-and-track: the first frame's most text-relevant token becomes a positive click."""
    rel = tracker.relevance(enc)
    i = int(np.argmax(rel))
    G = tracker.G
    cell = tracker.S / G
    xm, ym = (i % G + 0.5) * cell, (i // G + 0.5) * cell
    return (xm * w / tracker.S, ym * h / tracker.S), float(rel[i])


def parse_keep(keep):
    """A keep ratio in (0, 1], or "auto" (adaptive per-frame budget)."""
    if isinstance(keep, str):
        if keep.strip().lower() == "auto":
            return "auto"
        try:
            keep = float(keep)
        except ValueError:
            raise InputError(f"--keep must be a number in (0, 1] or 'auto', got {keep!r}") from None
    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0) or math.isnan(keep):
        raise InputError(f"--keep must be in (0, 1] or 'auto', got {keep}")
    return float(keep)


def keep_range(bundle) -> tuple:
    """The keep ratios the bundle's engines cover (all of (0, 1] for ONNX Runtime)."""
    rng = bundle.engines.get("keep_range")
    return tuple(rng) if rng else (0.3, 1.0)


def _prompt_frame(tracker: Tracker, image, enc: dict, prompt: PromptSpec, w: int, h: int):
    """The first frame: the user's clicks/box, or the text's most relevant token."""
    p = model_prompt(prompt, w, h, tracker.S)
    if p is None:
        xy, rel = text_start_point(tracker, enc, w, h)
        start = {"source": "text", "point": [round(xy[0], 1), round(xy[1], 1)], "relevance": rel}
        p = model_prompt(PromptSpec(points=[xy]), w, h, tracker.S)
    else:
        start = {"source": "user", "points": p.points.tolist(), "labels": p.labels.tolist()}
    return tracker.add_prompt_frame(0, image, p, enc=enc), start


def _object_prompts(prompt, bundle) -> dict:
    """{object id: PromptSpec}: one PromptSpec is object 1 (fastsam2-run's plain flags)."""
    prompts = {1: prompt} if isinstance(prompt, PromptSpec) else dict(prompt)
    if not prompts:
        raise InputError("give --prompt, --point or --box")
    for o, spec in prompts.items():
        if not (isinstance(o, int) and 1 <= o <= 254):
            raise InputError(f"object ids must be 1..254 (one palette index each), got {o!r}")
        if spec.text is not None and spec.text not in bundle.text_embeddings:
            known = ", ".join(repr(t) for t in bundle.text_embeddings)
            raise InputError(f"prompt {spec.text!r} is not in the bundle (it has {known}); "
                             f"export again with --prompts to add it")
        if spec.text is None and not (spec.points or spec.box):
            who = "" if len(prompts) == 1 else f" for object {o}"
            raise InputError(f"give --prompt, --point or --box{who}")
    return dict(sorted(prompts.items()))


def _frame_record(i: int, per: dict, masks: dict, enc_ms: float) -> dict:
    """results.json's entry for one frame: the object's numbers (several objects: per object,
    under "objects"), kept tokens and per-graph latency (the shared encoder counted once)."""
    objs = {}
    lat = {"image_encoder": enc_ms}
    for o, r in per.items():
        area, bbox = mask_area_bbox(masks[o])
        objs[o] = {"object_score": round(r.object_score, 4), "iou": round(r.iou, 4), "mask_area": area,
                   "bbox": bbox, "kept_tokens": r.kept_tokens}
        for k, v in r.latency_ms.items():
            lat[k] = lat.get(k, 0.0) + v
    rec = {"frame": i}
    if len(objs) == 1:
        rec.update(next(iter(objs.values())))
    else:
        rec.update(kept_tokens=int(round(np.mean([v["kept_tokens"] for v in objs.values()]))),
                   objects={str(o): v for o, v in objs.items()})
    rec["latency_ms"] = {k: round(v, 2) for k, v in lat.items()}
    return rec


def _validate_keep(keep, bundle):
    keep = parse_keep(bundle.manifest["keep"] if keep is None else keep)
    rng = bundle.engines.get("keep_range")
    if rng and keep != "auto" and not (rng[0] - 1e-9 <= keep <= rng[1] + 1e-9):
        raise InputError(f"--keep {keep} is outside the engines' profile range {rng[0]}..{rng[1]}")
    return keep


def track(input_path, bundle_dir, prompt, out, keep: float | None = None,
          backend: str = "auto", overlay: bool = True, max_frames: int | None = None,
          fill: str = "no_mem", threads: int | None = None, progress=None, warn=print) -> dict:
    """Track one object (a PromptSpec) or several ({object id: PromptSpec}) through a video or
    frames folder; returns the results dict. Objects share the image encoder; each has its own
    memory bank, as in SAM2's video predictor. Where masks overlap, a pixel goes to the object
    with the highest logit (one palette index per pixel)."""
    from fastsam2.runtime.outputs import OverlayWriter, atomic_write_json, ensure_writable_dir, write_palette_png
    from fastsam2.runtime.video import open_frames

    bundle = load_bundle(bundle_dir)
    keep = _validate_keep(keep, bundle)
    prompts = _object_prompts(prompt, bundle)
    if max_frames is not None and max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {max_frames}")
    pick_backend(backend, bundle)  # refuse an unavailable backend before opening the input
    m = bundle.manifest
    for flag, msg in ((m.get("weights_random"), RANDOM_WEIGHTS), (not m.get("router_trained"), UNTRAINED_ROUTER),
                      (m["text"].get("random"), RANDOM_TEXT)):
        if flag:
            warn(f"warning: {msg}")
    out = Path(out)
    source = open_frames(input_path)
    with source:
        ensure_writable_dir(out / "masks")
        chosen, sessions = open_backend(backend, bundle, threads, warn=warn)
        if backend == "auto":
            warn(f"backend: {chosen} (auto)")
        # the whole video's length, as SAM2 uses it (it scales object-pointer positions when the
        # video is shorter than 16 frames), even when --max-frames stops early
        num_frames = source.num_frames
        expected_frames = num_frames if max_frames is None else min(max_frames, num_frames or max_frames)
        trackers = {o: Tracker(sessions, bundle.constants, bundle.settings, keep=keep,
                               keep_floor=m.get("keep_floor", 64), fill=fill,
                               text_emb=bundle.text_embeddings.get(p.text) if p.text else None,
                               num_frames=num_frames, keep_range=keep_range(bundle))
                    for o, p in prompts.items()}
        ids = list(trackers)
        first = trackers[ids[0]]
        w, h = source.width, source.height
        resize = Resizer()
        frames, starts, t_start = [], {}, time.perf_counter()
        with contextlib.ExitStack() as stack:
            # the overlay is renamed into place on success and removed on any error
            writer = stack.enter_context(OverlayWriter(out / "overlay.mp4", w, h, source.fps)) if overlay else None
            for i, rgb in source:
                if max_frames is not None and i >= max_frames:
                    break
                t0 = time.perf_counter()
                image = first.preprocess(rgb)
                enc_lat = {}
                enc = first.encode(image, enc_lat)
                per = {}
                for o, tr in trackers.items():
                    if i == 0:
                        per[o], starts[o] = _prompt_frame(tr, image, enc, prompts[o], w, h)
                    else:
                        per[o] = tr.track(i, image, enc=enc)
                logits = {o: resize(r.low_res_logits[0, 0], (h, w)) for o, r in per.items()}
                masks = {o: v > 0 for o, v in logits.items()}
                index = compose_objects(np.stack([logits[o] for o in ids]), ids)
                write_palette_png(out / "masks" / f"{i:05d}.png", index)
                if writer is not None:
                    writer.write(rgb, index)
                frames.append(_frame_record(i, per, masks, enc_lat["image_encoder"]))
                frames[-1]["frame_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
                if progress is not None:
                    progress(i, expected_frames, frames[-1])
            if not frames:
                raise InputError(f"{input_path} has no frames")
    total = time.perf_counter() - t_start
    steady = [f["frame_ms"] for f in frames[min(len(frames) - 1, bundle.settings["num_maskmem"]):]]
    start_of = {o: {"text": prompts[o].text, **starts.get(o, {})} for o in ids}
    results = {
        "input": str(input_path), "backend": chosen, "keep": keep,
        "k": first.k if keep != "auto" else None, "tokens": first.T, "fill": fill,
        "prompt": start_of[ids[0]] if len(ids) == 1 else {"objects": {str(o): v for o, v in start_of.items()}},
        "objects": ids,
        "video": {"width": w, "height": h, "fps": source.fps, "frames": len(frames)},
        "totals": {"seconds": round(total, 3), "fps": round(len(frames) / total, 3),
                   "steady_fps": round(1e3 / float(np.median(steady)), 3) if steady else None,
                   "mean_kept_tokens": float(np.mean([f["kept_tokens"] for f in frames]))},
        "bundle": bundle.summary(),
        "frames": frames,
    }
    atomic_write_json(out / "results.json", results)
    return results


def track_davis_sequence(bundle_dir, frames_dir, first_frame_annotation_png, out_dir, keep=None,
                         backend: str = "ort-cpu", fill: str = "no_mem", threads: int | None = None,
                         bundle=None, sessions=None) -> dict:
    """Semi-supervised VOS as DAVIS scores it: every object of the first annotation is a mask
    prompt (SAM2's add_new_mask); each object is tracked on its own, sharing the image encoder;
    a pixel goes to the object with the highest positive logit. Writes <out>/<frame>.png."""
    from fastsam2.runtime.outputs import ensure_writable_dir, read_palette_png, write_palette_png
    from fastsam2.runtime.video import open_frames

    bundle = load_bundle(bundle_dir) if bundle is None else bundle
    keep = _validate_keep(keep, bundle)
    if sessions is None:
        sessions = open_backend(backend, bundle, threads)[1]
    ann = read_palette_png(first_frame_annotation_png)
    ids = [int(i) for i in np.unique(ann) if 0 < i < 255]
    if not ids:
        raise InputError(f"{first_frame_annotation_png} has no objects")
    out = Path(out_dir)
    ensure_writable_dir(out)
    m = bundle.manifest
    resize = Resizer()
    kept, t0 = [], time.perf_counter()
    with open_frames(frames_dir) as source:
        if ann.shape != (source.height, source.width):
            raise InputError(f"annotation {first_frame_annotation_png} is {ann.shape[1]}x{ann.shape[0]}, "
                             f"frames are {source.width}x{source.height}")
        trackers = {o: Tracker(sessions, bundle.constants, bundle.settings, keep=keep,
                               keep_floor=m.get("keep_floor", 64), fill=fill,
                               num_frames=source.num_frames, keep_range=keep_range(bundle)) for o in ids}
        names = getattr(source, "frame_names", None)
        for i, rgb in source:
            first = trackers[ids[0]]
            image = first.preprocess(rgb)
            enc = first.encode(image, {})
            logits = np.full((len(ids), source.height, source.width), -np.inf, np.float32)
            for j, o in enumerate(ids):
                tr = trackers[o]
                r = tr.add_mask_frame(0, image, ann == o, enc=enc) if i == 0 else tr.track(i, image, enc=enc)
                logits[j] = resize(r.low_res_logits[0, 0], (source.height, source.width))
                kept.append(r.kept_tokens)
            index = compose_objects(logits, ids)
            write_palette_png(out / f"{names[i] if names else f'{i:05d}'}.png", index)
    return {"objects": ids, "frames": i + 1, "seconds": time.perf_counter() - t0,
            "mean_kept_tokens": float(np.mean(kept)), "keep": keep}
