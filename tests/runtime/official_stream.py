"""SAM2VideoPredictor driven in streaming order — the reference for the session API — and the
same scenario driven through a fastsam2 Session.

A scenario is a list of steps over a frames folder:
    ("click", frame, obj, points, labels)   add_new_points_or_box before `frame` is tracked
    ("correct", frame, obj, points, labels) add_new_points_or_box on a frame already tracked
    ("box", frame, obj, box)                a box on a frame not yet tracked
    ("mask", frame, obj, bool HxW)          add_new_mask on a frame not yet tracked
SAM2 runs them as: propagate up to the step's frame (max_frame_num_to_track), add, go on;
the session as: add_prompt(frame=...) before that frame is pushed, or after (corrections).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from fastsam2.runtime.sam2_math import Resizer


def frame_paths(frames_dir) -> list:
    return sorted(p for p in Path(frames_dir).iterdir() if p.suffix == ".jpg")


def read_frames(frames_dir) -> list:
    return [np.asarray(Image.open(p).convert("RGB")) for p in frame_paths(frames_dir)]


def official(predictor, frames_dir, steps, max_cond=None, correct_as_cond=False) -> dict:
    """{frame: {obj: video-resolution logits}}: SAM2's output for every frame, the corrected
    output for a frame that received a correction."""
    import torch

    n = len(frame_paths(frames_dir))
    out = {}
    saved = predictor.max_cond_frames_in_attn, predictor.add_all_frames_to_correct_as_cond
    predictor.max_cond_frames_in_attn = -1 if max_cond is None else max_cond
    predictor.add_all_frames_to_correct_as_cond = correct_as_cond
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            state = predictor.init_state(str(frames_dir))
            done = -1  # last frame propagated

            def collect(fi, ids, masks):
                out[fi] = {int(o): masks[j, 0].float().numpy().copy() for j, o in enumerate(ids)}

            def propagate_to(last):
                nonlocal done
                if last > done:
                    for fi, ids, masks in predictor.propagate_in_video(
                            state, start_frame_idx=done + 1, max_frame_num_to_track=last - done - 1):
                        collect(fi, ids, masks)
                    done = last

            for step in steps:
                kind, frame, obj = step[:3]
                # a correction comes after its frame was tracked; a prompt before
                propagate_to(frame if kind == "correct" else frame - 1)
                if kind in ("click", "correct"):
                    fi, ids, masks = predictor.add_new_points_or_box(
                        state, frame_idx=frame, obj_id=obj, points=np.asarray(step[3], np.float32),
                        labels=np.asarray(step[4], np.int32))
                elif kind == "box":
                    fi, ids, masks = predictor.add_new_points_or_box(state, frame_idx=frame, obj_id=obj,
                                                                     box=np.asarray(step[3], np.float32))
                else:
                    fi, ids, masks = predictor.add_new_mask(state, frame, obj, step[3])
                if kind == "correct":  # the corrected output of the frame
                    collect(fi, ids, masks)
            propagate_to(n - 1)
    finally:
        predictor.max_cond_frames_in_attn, predictor.add_all_frames_to_correct_as_cond = saved
    return out


def ours(session, frames_dir, steps, record=None) -> dict:
    """The same scenario through a fastsam2 Session: {frame: {obj: video-resolution logits}}."""
    rgbs = read_frames(frames_dir)
    h, w = rgbs[0].shape[:2]
    rs = Resizer()
    out = {}
    before = {}
    after = {}
    for step in steps:
        (after if step[0] == "correct" else before).setdefault(step[1], []).append(step)
    for t, rgb in enumerate(rgbs):
        for step in before.get(t, []):
            kind, frame, obj = step[:3]
            if kind == "click":
                pts, labels = np.asarray(step[3], float), np.asarray(step[4])
                session.add_prompt(obj, frame=t, points=pts[labels == 1], neg_points=pts[labels == 0])
            elif kind == "box":
                session.add_prompt(obj, frame=t, box=step[3])
            else:
                session.add_prompt(obj, frame=t, mask=step[3])
        res = session.push(rgb)
        for step in after.get(t, []):
            pts, labels = np.asarray(step[3], float), np.asarray(step[4])
            res = session.add_prompt(step[2], frame=t, points=pts[labels == 1], neg_points=pts[labels == 0])
        out[t] = {o: rs(r.logits, (h, w)) for o, r in res.objects.items()}
        if record is not None:
            record.append(res)
    return out


def inside(video, frame, obj, which=0.5):
    """A pixel of object `obj` on `frame` (the which-quantile of its pixels in row order)."""
    ys, xs = np.nonzero(video.read_mask(frame) == obj)
    i = int(which * (len(xs) - 1))
    return [float(xs[i]), float(ys[i])]


def first_click(video):
    return ("click", 0, 1, [list(map(float, video.first_frame_points[1]))], [1])


def correction_steps(video):
    """Click object 1 on frame 0; on frame 5, a new positive click and a negative one."""
    return [first_click(video), ("click", 5, 1, [inside(video, 5, 1, 0.3), inside(video, 5, 2)], [1, 0])]


def compare(ref: dict, got: dict, frames=None) -> tuple:
    """(max-abs logits difference, min mask IoU) over the frames and objects both have; asserts
    they cover the same objects on each compared frame."""
    worst, min_iou = 0.0, 1.0
    for f in (sorted(ref) if frames is None else frames):
        assert set(ref[f]) == set(got[f]), (f, sorted(ref[f]), sorted(got[f]))
        for o in ref[f]:
            a, b = ref[f][o], got[f][o]
            worst = max(worst, float(np.abs(a - b).max()))
            union = np.logical_or(a > 0, b > 0).sum()
            min_iou = min(min_iou, 1.0 if union == 0 else float(np.logical_and(a > 0, b > 0).sum() / union))
    return worst, min_iou


class Scenarios:
    """The streaming scenarios on one video, each SAM2 reference computed once per test session
    (the session parity tests and the mutation check share them)."""

    def __init__(self, loaded, video, tmp_dir):
        self.predictor_loaded = loaded  # LoadedSAM2 (the pruned reference takes it)
        self.predictor, self.video, self.tmp = loaded.model, video, Path(tmp_dir)
        self._refs = {}

    def steps(self, name: str) -> list:
        v = self.video
        if name == "correction":  # (a) a prompt on frame 5 for a tracked object
            return correction_steps(v)
        if name in ("tracked_correction", "tracked_correction_cond"):  # a click on frame 5 after it
            # was tracked; _cond: with SAM2's add_all_frames_to_correct_as_cond
            return [first_click(v), ("correct", 5, 1, [inside(v, 5, 1, 0.3)], [1])]
        if name == "bounded":  # four prompts, two conditioning frames attended
            return [first_click(v)] + [("click", f, 1, [inside(v, f, 1, 0.2 + 0.2 * i)], [1])
                                       for i, f in enumerate((2, 3, 6))]
        if name == "late":  # (b) object 2 starts on frame 4 with a box
            ys, xs = np.nonzero(v.read_mask(4) == 2)
            return [first_click(v), ("box", 4, 2, [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())])]
        raise KeyError(name)

    def options(self, name: str) -> dict:
        """The session options of the scenario."""
        if name == "bounded":
            return {"max_cond_frames": 2}
        return {"correct_as_cond": True} if name == "tracked_correction_cond" else {}

    def reference(self, name: str) -> dict:
        """{frame: {obj: logits}} of SAM2VideoPredictor on the scenario."""
        if name in self._refs:
            return self._refs[name]
        import shutil

        steps, frames_dir = self.steps(name), self.video.frames_dir_or_file
        if name == "late":  # object 1 as SAM2 tracks it alone; object 2 as SAM2 on frames 4.. alone
            ref1 = official(self.predictor, frames_dir, steps[:1])
            alone = self.tmp / "from4"
            if not alone.exists():
                alone.mkdir(parents=True)
                for i, p in enumerate(frame_paths(frames_dir)[4:]):
                    shutil.copy(p, alone / f"{i:05d}.jpg")
            ref2 = official(self.predictor, alone, [("box", 0, 2, steps[1][3])])
            ref = {f: {**ref1[f], **(ref2[f - 4] if f >= 4 else {})} for f in ref1}
        else:
            ref = official(self.predictor, frames_dir, steps, max_cond=self.options(name).get("max_cond_frames"),
                           correct_as_cond=name == "tracked_correction_cond")
        self._refs[name] = ref
        return ref

    def track(self, name: str, session, record=None) -> dict:
        """`session` driven through the scenario: {frame: {obj: video-resolution logits}}."""
        return ours(session, self.video.frames_dir_or_file, self.steps(name), record=record)

    def check(self, name: str, session) -> tuple:
        """(max-abs, min IoU) of `session` driven through the scenario against SAM2."""
        return compare(self.reference(name), self.track(name, session))
