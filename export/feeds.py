"""Calibration feeds: what each graph really receives while the streaming session tracks
frames (ONNX Runtime, CPU, fp32), recorded per call, and the calib_<graph>.npz files that hold
them. fastsam2-calibrate int8 writes them for TensorRT; export's precision gate calibrates its
static int8 variants from them (or records its own)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, keep_to_k
from fastsam2.runtime.errors import InputError, OutputError

log = logging.getLogger(__name__)


class RecordingSession:
    """Wraps a session; keeps a private copy of every feed (the bank reuses its buffers)."""

    def __init__(self, session, store: list):
        self.session = session
        self.store = store
        self.input_names = list(session.input_names)
        self.output_names = list(session.output_names)

    def run(self, feeds: dict) -> dict:
        self.store.append({n: np.array(feeds[n], copy=True) for n in self.input_names})
        return self.session.run(feeds)


def record_feeds(bundle, frames, max_frames: int = 32, prompt: str | None = None,
                 point=None, keep: float | None = None, threads: int | None = None,
                 num_frames: int | None = None, level: int = logging.INFO) -> dict:
    """{graph: [feed dict per call]} over the first `max_frames` frames, ONNX Runtime CPU: the
    streaming session's own loop on recording graph sessions. `level`: of the line saying what
    was recorded (the precision gate, which records for itself, logs it at DEBUG)."""
    from fastsam2.runtime.backends import create_sessions
    from fastsam2.runtime.session import Session

    if max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {max_frames}")
    m = bundle.manifest
    keep = float(m["keep"]) if keep is None else keep
    if not 0.0 < keep <= 1.0:
        raise InputError(f"--keep must be in (0, 1], got {keep}")
    prompts = list(bundle.text_embeddings)
    if prompt is None:
        prompt = prompts[0] if prompts else None
    elif prompt not in bundle.text_embeddings:
        raise InputError(f"prompt {prompt!r} is not in the bundle (it has {', '.join(map(repr, prompts))})")
    if prompt is None and point is None:
        raise InputError("the bundle has no text prompts: give --point x,y")
    store = {g: [] for g in GRAPH_ORDER}
    sessions = {g: RecordingSession(s, store[g]) for g, s in create_sessions(bundle, "ort-cpu", threads, precision="fp32").items()}
    session = Session.open(bundle, keep=keep, graphs=("ort-cpu", sessions),
                           num_frames=None if num_frames is None else min(num_frames, max_frames))
    # search-and-track with the text alone, as fastsam2-run does with --prompt only
    session.add_prompt(1, points=[] if point is None else [tuple(point)], text=prompt)
    text_emb = (np.asarray(bundle.text_embeddings[prompt], np.float32).reshape(1, -1) if prompt
                else np.zeros((1, int(bundle.settings.get("text_dim", 512))), np.float32))
    n, prev = 0, None
    for i, rgb in frames:
        if i >= max_frames:
            break
        if prev is None:
            G4 = session.S // 4
            prev = np.zeros((1, 1, G4, G4), np.float32)
        routed = len(store["router"])
        r = session.push(rgb)
        if len(store["router"]) == routed:
            # keep 1.0 (k = T) skips the router; an int8 router engine still needs its ranges.
            # The memory encoder's `feat` is this frame's raw image features.
            feat = store["memory_encoder"][-1]["feat"]
            sessions["router"].run({"feat": feat, "text_emb": text_emb, "prev_mask_logits": prev})
        prev = r.objects[1].logits[None, None].astype(np.float32)
        n += 1
    if n == 0:
        raise InputError("no frames to calibrate on")
    k = keep_to_k(keep, session.T, m.get("keep_floor", 64))
    log.log(level, f"recorded {n} frames at keep {keep} (k = {k} of {session.T} tokens), prompt {prompt!r}")
    return store


def save_feeds(path: Path, graph: str, feeds: list) -> dict:
    """One graph's feeds as an npz; returns {input: shape or "dynamic"} for the summary."""
    names = GRAPHS[graph].input_names
    arrays = {"input_names": np.array(names), "num_batches": np.array(len(feeds))}
    shapes = {}
    for name in names:
        vals = [f[name] for f in feeds]
        if len({v.shape for v in vals}) == 1:
            arrays[name] = np.stack(vals)
            shapes[name] = list(vals[0].shape)
        else:  # a dynamic axis changed between calls: keep each array as it was fed
            arrays.update({f"{name}_{i}": v for i, v in enumerate(vals)})
            shapes[name] = "dynamic"
    try:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return shapes


def load_feeds(path) -> list:
    """`save_feeds` output back as a list of feed dicts (what a calibrator iterates)."""
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["input_names"]]
        count = int(z["num_batches"])
        # by contract name first: an input named high_res_0 is stacked, never `high_res` + _0
        cols = {n: (list(z[n]) if n in z.files else [z[f"{n}_{i}"] for i in range(count)]) for n in names}
    return [{n: np.ascontiguousarray(cols[n][i]) for n in names} for i in range(count)]
