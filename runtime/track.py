"""`track(...)`: the library behind fastsam2-run, a loop over the streaming session
(runtime/session.py): frames in, masks + overlay + results.json out.

Frames are decoded and processed one at a time (memory is flat in video length); every mask
PNG is written atomically as soon as its frame is done, and results.json is written however the
run ends (finished, stopped, or failed part-way), so the outputs on disk are always complete
for the frames they cover.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastsam2.runtime.bundle import load_bundle
from fastsam2.runtime.contract import keep_to_k
from fastsam2.runtime.errors import FastSam2Error, InputError, quoted
from fastsam2.runtime.session import PromptSpec, Session, check_object_id, model_prompt, validate_keep  # noqa: F401

log = logging.getLogger(__name__)

RESULTS_SCHEMA = 2
UNTRAINED_ROUTER = ("the bundle's router is untrained: its text term is noise, so pruning and "
                    "text-only starts rely on visual and uncertainty cues only")
RANDOM_TEXT = "the bundle's text embeddings come from a randomly initialised CLIP: they carry no meaning"
RANDOM_WEIGHTS = "the bundle was exported from randomly initialised SAM2 weights: masks are not meaningful"
# bounds of the run's own flags (README, fastsam2-run): a frame count or a wait past these is a
# typo, and inf or 1e12 seconds overflow the waits they become (OverflowError, not an error line)
MAX_FRAMES = 2**31 - 1  # frames a run may process; prompt frames are 0..MAX_FRAMES - 1
MAX_DURATION = 31 * 24 * 3600.0  # seconds (--duration): a month; leave it out to run until stopped
MAX_TIMEOUT = 3600.0  # seconds (--timeout) a source may take to open or to deliver a frame


@dataclass
class Scheduled:
    """A prompt (spec) or a removal (spec None) for object `obj` at source frame `frame`."""

    frame: int
    obj: int
    spec: PromptSpec | None = None

    def describe(self) -> str:
        what = "--remove" if self.spec is None else "prompt"
        return f"{what} {self.obj}@{self.frame}"


def as_schedule(prompt, removals=()) -> list:
    """Prompts as fastsam2-run and the library take them -> [Scheduled], in frame order.

    `prompt` is a PromptSpec (object 1, frame 0), {object id: PromptSpec} (frame 0) or an
    iterable of Scheduled / (frame, object, PromptSpec); `removals` of (frame, object).
    """
    if isinstance(prompt, PromptSpec):
        items = [Scheduled(0, 1, prompt)]
    elif isinstance(prompt, dict):
        items = [Scheduled(0, o, s) for o, s in prompt.items()]
    else:
        items = [p if isinstance(p, Scheduled) else Scheduled(*p) for p in prompt]
    items += [Scheduled(f, o, None) for f, o in removals]
    if not any(s.spec is not None for s in items):
        raise InputError("give --prompt, --point or --box")
    for s in items:
        check_object_id(s.obj)
        if isinstance(s.frame, bool) or not isinstance(s.frame, (int, np.integer)) or not 0 <= s.frame < MAX_FRAMES:
            raise InputError(f"{'--remove' if s.spec is None else 'prompt'} for object {s.obj}: the frame must be "
                             f"an integer in 0..{MAX_FRAMES - 1}, got {shown(s.frame)}")
    return sorted(items, key=lambda s: (s.frame, s.spec is not None, s.obj))


def shown(value) -> str:
    """A user's number as a message repeats it: str() of an int over 4300 digits raises."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)) >= 10**18:
        return f"an integer of {int(value).bit_length()} bits"
    return quoted(value, 24)


def check_run_limits(max_frames=None, duration=None, timeout=10.0, checkpoint_every=None) -> None:
    """--max-frames, --duration, --timeout, --checkpoint-every in their bounds, before anything is opened."""
    for flag, n in (("--max-frames", max_frames), ("--checkpoint-every", checkpoint_every)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_FRAMES):
            raise InputError(f"{flag} must be an integer in 1..{MAX_FRAMES}, got {shown(n)}")
    for flag, value, top in (("--duration", duration, MAX_DURATION), ("--timeout", timeout, MAX_TIMEOUT)):
        if value is None and flag == "--duration":
            continue
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or not 0 < value <= top):
            raise InputError(f"{flag} must be a number of seconds in (0, {int(top)}], got {shown(value)}")


def _check_schedule(schedule: list, bundle, source) -> None:
    """Everything that can be checked before the first frame: known texts, prompts that say
    something, frames inside a file, removals of objects that exist by then."""
    started = set()
    for s in schedule:
        if source.num_frames is not None and not source.live and s.frame >= source.num_frames:
            raise InputError(f"{s.describe()} is past the end of {source.name!r} "
                             f"({source.num_frames} frames: 0..{source.num_frames - 1})")
        if s.spec is None:
            if s.obj not in started:
                raise InputError(f"--remove {s.obj}@{s.frame}: object {s.obj} has no prompt on or "
                                 f"before frame {s.frame}")
            started.discard(s.obj)
            continue
        spec = s.spec
        if spec.text is not None and spec.text not in bundle.text_embeddings:
            known = ", ".join(repr(t) for t in bundle.text_embeddings)
            raise InputError(f"prompt {quoted(spec.text)} is not in the bundle (it has {known}); "
                             f"export again with --prompts to add it")
        if spec.text is None and not spec.has_geometry and spec.mask is None:
            raise InputError(f"give --prompt, --point or --box for object {s.obj}")
        model_prompt(spec, source.width, source.height, bundle.settings["image_size"])
        started.add(s.obj)


def _warn_about_bundle(bundle, warn) -> None:
    m = bundle.manifest
    for flag, msg in ((m.get("weights_random"), RANDOM_WEIGHTS), (not m.get("router_trained"), UNTRAINED_ROUTER),
                      (m["text"].get("random"), RANDOM_TEXT)):
        if flag:
            warn(f"warning: {msg}")


def _frame_record(res, index: int) -> dict:
    rec = res.to_json()
    rec["frame"] = index
    objs = list(res.objects.values())
    # frame-level summaries: tokens kept (mean over objects) and pixels given to any object
    rec["kept_tokens"] = int(round(np.mean([o.kept_tokens for o in objs]))) if objs else 0
    rec["mask_area"] = int(np.count_nonzero(res.index_mask))
    return rec


def track(input_path, bundle_dir, prompt, out, keep: float | None = None,
          backend: str = "auto", overlay: bool = True, max_frames: int | None = None,
          fill: str = "no_mem", threads: int | None = None, progress=None, warn=None,
          removals=(), realtime: bool = False, duration: float | None = None,
          max_cond_frames: int | None = None, force: bool = False,
          timeout: float = 10.0, checkpoint_every: int | None = None, resume: bool = False) -> dict:
    """Track the prompted objects through a video, a frames folder, a camera or a stream URL;
    returns the results dict (also written to <out>/results.json).

    `prompt`: a PromptSpec (object 1 on frame 0), {object id: PromptSpec} (all on frame 0), or
    a schedule of (frame, object id, PromptSpec); `removals`: (frame, object id) pairs. Objects
    share the image encoder, each has its own memory bank (SAM2's video predictor); where masks
    overlap a pixel goes to the object with the highest logit (one palette index per pixel).
    With `realtime`, a live source hands over its newest frame and drops the ones that arrived
    meanwhile; a prompt for a dropped frame is applied on the next frame processed. `timeout`:
    seconds a live source may take to open or to deliver the next frame. `checkpoint_every`: a
    checkpoint in `out` every N frames; `resume`: go on from it (runtime/resume.py). Warnings
    and the backend picked go to this module's logger, or all to `warn(line)` where one is given
    (tests still pass one).
    """
    from fastsam2.runtime import resume as ck
    from fastsam2.runtime.run_folder import RunFolder
    from fastsam2.runtime.video import open_frames

    check_run_limits(max_frames, duration, timeout, checkpoint_every)
    # a bundle folder (local), or a remote model (fastsam2.serve.client: same interface, its
    # sessions run on a Triton server)
    remote = hasattr(bundle_dir, "open_session")
    ck.check_flags(input_path, checkpoint_every, resume, remote=remote, force=force)
    start = ck.read_checkpoint(out) if resume else None
    bundle = bundle_dir if remote else load_bundle(bundle_dir)
    keep = validate_keep(keep, bundle)
    schedule = as_schedule(prompt, removals)
    if not remote:
        from fastsam2.runtime.backends import BACKENDS, check_threads

        check_threads(threads)
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {quoted(backend, 24)}; choose from {', '.join(BACKENDS)}")
    say = warn or log.info
    warn = warn or log.warning  # the backends and the session still take a callback
    _warn_about_bundle(bundle, warn)
    source = open_frames(input_path, realtime=realtime, open_timeout=timeout)
    with source:
        _check_schedule(schedule, bundle, source)
        kwargs = {} if max_cond_frames is None else {"max_cond_frames": max_cond_frames}
        run_id = (ck.run_identity(source, bundle, keep, fill, max_cond_frames, schedule)
                  if resume or checkpoint_every else None)
        if start is not None:  # the same run, or one line; the session goes on from its snapshot
            ck.check_identity(start, run_id, out)
            kwargs["snapshot"] = start.snapshot
        if remote:
            opener = bundle.open_session
        else:  # the backend is resolved once, here; the session gets its open graphs
            from fastsam2.runtime.backends import open_backend

            opener = functools.partial(Session.open, bundle, graphs=open_backend(backend, bundle, threads, warn=warn))
        session = opener(keep=keep, backend=backend, threads=threads, fill=fill,
                         num_frames=None if source.live else source.num_frames,
                         frame_size=(source.width, source.height), warn=warn, **kwargs)
        if backend == "auto":
            say(f"backend: {session.backend} (auto)")
        # record=True: --force replaces only the files the last run recorded as its own
        with RunFolder(out, force=force, record=True, resume=resume) as run, contextlib.closing(session):
            checkpoints = None if run_id is None else ck.Checkpoints(run, checkpoint_every, run_id, start)
            results, error = _loop(session, source, schedule, run, bundle, keep, fill, overlay,
                                   max_frames, duration, progress, input_path, checkpoints)
    if error is not None:
        raise error
    return results


def _loop(session, source, schedule, run, bundle, keep, fill, overlay, max_frames, duration,
          progress, input_path, checkpoints=None) -> tuple:
    """Frames through the session into the run folder. However the loop ends, the frames done
    are complete on disk (masks, overlay, results.json) before the reason is raised. A resumed
    run (`checkpoints.start`) reads its done frames again for the overlay, then goes on."""
    from fastsam2.runtime.outputs import OverlayWriter, atomic_write_json, read_palette_png, write_palette_png
    from fastsam2.runtime.cli_edge import Terminated

    expected = source.num_frames if max_frames is None else min(max_frames, source.num_frames or max_frames)
    ck = checkpoints
    done = 0 if ck is None else ck.next  # frames a resumed run's checkpoint covers
    frames, todo = ([] if ck is None else ck.frames()), [s for s in schedule if s.frame >= done]
    t_start = time.perf_counter() - (0.0 if ck is None else ck.seconds())
    status, error, unrecorded = "finished", None, None
    writer = (OverlayWriter(run.file("overlay.mp4"), source.width, source.height, source.fps)
              if overlay else None)
    frame_iter = source.frames()
    if done:  # the overlay of the done frames, with the prompts given on each; nothing changed if this fails
        try:
            ck.replay(frame_iter, None if writer is None else lambda rgb, i: writer.write(
                rgb, read_palette_png(run.mask_path(i)), [e for e in session.prompt_log if e["frame"] == i]),
                progress, expected)
        except BaseException:
            if writer is not None:
                writer._abort()
            raise
    try:
        for index, timestamp, rgb in frame_iter:
            # prompts and removals due by this frame (those of a dropped frame apply here)
            asked = {}
            while todo and todo[0].frame <= index:
                s = todo.pop(0)
                if s.spec is None:
                    session.remove(s.obj)
                else:
                    spec = s.spec
                    session.add_prompt(s.obj, points=spec.points, neg_points=spec.neg_points,
                                       box=spec.box, mask=spec.mask, text=spec.text)
                    asked[s.obj] = s.frame
            logged = len(session.prompt_log)
            res = session.push(rgb, timestamp=timestamp)
            for entry in session.prompt_log[logged:]:  # in source frame numbers
                entry["frame"] = index
                if asked.get(entry["object"], index) != index:
                    entry["requested_frame"] = asked[entry["object"]]
            record = _frame_record(res, index)
            unrecorded = run.mask_path(index)  # on disk, not yet in results.json: removed if the run stops here
            write_palette_png(unrecorded, res.index_mask)
            if writer is not None:
                writer.write(rgb, res.index_mask, session.prompt_log[logged:])
            frames.append(record)
            unrecorded = None
            if ck is not None:
                ck.frame_done(index, rgb, run.mask_path(index), frames, session, time.perf_counter() - t_start)
            if progress is not None:
                progress(len(frames) - 1, expected, frames[-1])
            if max_frames is not None and len(frames) >= max_frames:
                break
            if duration is not None and time.perf_counter() - t_start >= duration:
                break
        if not frames:
            raise InputError(f"{input_path} has no frames")
        source.check_complete()
    except (KeyboardInterrupt, Terminated) as e:
        status, error = "interrupted", e
    except FastSam2Error as e:
        status, error = "failed", e
    except BaseException:
        if writer is not None:
            writer._abort()
        raise
    finally:
        source.stop()
    if unrecorded is not None:  # the masks on disk are those of the frames results.json holds
        with contextlib.suppress(OSError):
            unrecorded.unlink()
    if writer is not None:
        if frames:
            writer.close()  # the overlay of the frames done, even when the run stopped early
        else:
            writer._abort()
    results = _results(input_path, source, session, bundle, keep, fill, frames, schedule,
                       time.perf_counter() - t_start, status, error)
    if frames:
        atomic_write_json(run.file("results.json"), results)
    if ck is not None:
        ck.finish(status)
    return results, error


def _results(input_path, source, session, bundle, keep, fill, frames, schedule, total, status, error) -> dict:
    from fastsam2.runtime.outputs import finite_or_none

    steady = [f["frame_ms"] for f in frames[min(len(frames) - 1, bundle.settings["num_maskmem"]):]] if frames else []
    dropped = getattr(source, "dropped", 0)
    results = {
        "schema": RESULTS_SCHEMA,
        "input": str(input_path),
        "status": status,
        **({"error": str(error) if str(error) else type(error).__name__} if error is not None else {}),
        "backend": session.backend, "keep": keep,
        "k": None if keep == "auto" else keep_to_k(keep, session.T, int(bundle.manifest.get("keep_floor", 64))),
        "tokens": session.T, "fill": fill, "max_cond_frames": session.max_cond_frames,
        "objects": sorted({s.obj for s in schedule if s.spec is not None}),
        "prompts": list(session.prompt_log),
        "removals": [{"object": s.obj, "frame": s.frame} for s in schedule if s.spec is None],
        "source": {"kind": source.kind, "live": bool(source.live), "nominal_fps": finite_or_none(source.fps, 3),
                   "declared_frames": source.num_frames, "width": source.width, "height": source.height},
        "video": {"width": source.width, "height": source.height, "fps": finite_or_none(source.fps, 3),
                  "frames": len(frames)},
        "dropped_frames": {"count": int(dropped), "ranges": [list(r) for r in getattr(source, "dropped_ranges", [])]},
        "totals": {"seconds": round(total, 3), "fps": round(len(frames) / total, 3) if total > 0 else None,
                   "steady_fps": round(1e3 / float(np.median(steady)), 3) if steady else None,
                   "mean_kept_tokens": float(np.mean([f["kept_tokens"] for f in frames])) if frames else None},
        "bundle": bundle.summary(),
        "frames": frames,
    }
    note = _auto_note(keep, frames, session.T, bundle)
    if note:
        results["note"] = note
    return results


def _auto_note(keep, frames, T: int, bundle) -> str | None:
    """Why --keep auto kept (nearly) every token, when it did. The budget is the tokens in or
    near the last mask (always kept) plus those holding 80 % of the router's score mass on the
    rest, widened by motion: say which of these filled it."""
    budgets = [o["budget"] for f in frames for o in f["objects"].values() if "budget" in o]
    if keep != "auto" or not budgets or np.mean([b["k"] for b in budgets]) < 0.95 * T:
        return None
    prior = np.mean([b["prior"] for b in budgets]) / T
    mass = np.mean([b["mass"] for b in budgets]) / T
    motion = np.mean([b["motion"] for b in budgets])
    why = []
    if prior >= 0.5:
        why.append(f"the tracked masks cover most of the frame, and every token in or near the "
                   f"last mask is kept ({prior:.0%} of them)")
    if mass >= 0.25:
        untrained = "" if bundle.manifest.get("router_trained", True) else " (an untrained router's scores are flat)"
        why.append(f"80 % of the router's score mass needs {mass:.0%} of the other tokens{untrained}")
    if motion > 0.05:
        why.append(f"motion ({motion:.2f}) widened the budget by {2 * motion:.0%}")
    return "--keep auto kept every token: " + "; ".join(why or ["the budget reached its maximum"])


def track_davis_sequence(bundle_dir, frames_dir, first_frame_annotation_png, out_dir, keep=None,
                         backend: str = "ort-cpu", fill: str = "no_mem", threads: int | None = None,
                         bundle=None, sessions=None) -> dict:
    """Semi-supervised VOS as DAVIS scores it: every object of the first annotation is a mask
    prompt on frame 0 (SAM2's add_new_mask); each object is tracked on its own, sharing the
    image encoder; a pixel goes to the object with the highest positive logit. Writes
    <out>/<frame>.png."""
    from fastsam2.runtime.outputs import ensure_writable_dir, read_palette_png, write_palette_png
    from fastsam2.runtime.video import open_frames

    bundle = load_bundle(bundle_dir) if bundle is None else bundle
    keep = validate_keep(keep, bundle)
    ann = read_palette_png(first_frame_annotation_png)
    ids = [int(i) for i in np.unique(ann) if 0 < i < 255]
    if not ids:
        raise InputError(f"{first_frame_annotation_png} has no objects")
    out = Path(out_dir)
    ensure_writable_dir(out)
    kept, t0 = [], time.perf_counter()
    with open_frames(frames_dir) as source:
        if ann.shape != (source.height, source.width):
            raise InputError(f"annotation {first_frame_annotation_png} is {ann.shape[1]}x{ann.shape[0]}, "
                             f"frames are {source.width}x{source.height}")
        # `sessions`: the bundle's graphs already open on `backend`, shared between sequences
        session = Session.open(bundle, keep=keep, backend=backend, threads=threads, fill=fill,
                               num_frames=source.num_frames, warn=lambda m: None,
                               graphs=None if sessions is None else (backend, sessions))
        for o in ids:
            session.add_prompt(o, frame=0, mask=ann == o)
        names = getattr(source, "frame_names", None)
        n = 0
        with contextlib.closing(session):
            for i, rgb in source:
                res = session.push(rgb)
                kept += [r.kept_tokens for r in res.objects.values()]
                write_palette_png(out / f"{names[i] if names else f'{i:05d}'}.png", res.index_mask)
                n = i + 1
    return {"objects": ids, "frames": n, "seconds": time.perf_counter() - t0,
            "mean_kept_tokens": float(np.mean(kept)), "keep": keep}
