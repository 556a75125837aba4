"""The wire format between `fastsam2-run --server` and the tracker model, in one place.

One Triton sequence = one stream = one session on the server (Triton's correlation id names it).
Every request carries:
  FRAME     UINT8 [H*W*3]    the frame's RGB bytes, flat: Triton checks the byte count against
                             one dimension before the model sees it (a declared [2**32, 2**32, 3]
                             overflows that check and killed the model process); a 3-byte
                             placeholder for requests that carry no frame (open, correct, close)
  COMMANDS  BYTES [1]        JSON: {"op": "open"|"push"|"correct"|"close", "token", ...} (below;
                             checked by serve/commands.py before anything acts on it)
and the sequence batcher adds START / END / CORRID (Triton's control inputs). Every response:
  LOGITS    FP32 [N, S/4, S/4]  each object's low-res mask logits (SAM2's pred_masks), ids ascending
  RESULT    BYTES [1]           JSON: frame number, per-object numbers, latencies, prompt log
The client turns LOGITS + RESULT into the local FrameResult with
fastsam2.runtime.session.frame_result, so masks are computed from the same float32 logits by the
same code as a local run.

Ops:
  open    (START)  {"options": {keep, fill, num_frames, frame_size, max_cond_frames}}
                   -> {"backend", "tokens", "max_cond_frames", "token"}: every later request of
                   the stream carries that "token" (a stream is bound to its opener; a START on
                   a live id is refused)
                   + "resume": {"token"}: continue the stream from the server's state store
                   (fastsam2-serve --state-store) on a node that does not hold it -> also
                   {"resumed": seq of the last request the restored state includes}
  every later request carries "seq", the client's request number (1, 2, ...): the server saves
                   a request's effect in its state store when the next request arrives
  push             {"ops": [prompt|remove, ...], "timestamp", "shape": [H, W]} then the frame is tracked
                   prompt: {"op": "prompt", "obj", "frame", "text", "points", "neg_points", "box", "mask"}
                   remove: {"op": "remove", "obj", "frame"}
  correct          {"ops": [prompt, ...]} on the frame just pushed (SAM2's correction)
  close   (END)    frees the session
Errors come back as Triton errors whose message starts with the error class name
("InputError: ..."), so the client raises the same FastSam2Error subclass as a local run.

Numpy and the standard library only: both the server (python backend) and the client import it.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from fastsam2.runtime import errors

MODEL = "fastsam2_tracker"  # the tracker model's name in the repository
# gRPC metadata every request of a stream carries (its correlation id): a balancer in front of
# several nodes hashes it to keep a stream on one node (deploy/haproxy/haproxy.cfg)
STREAM_HEADER = "x-fastsam2-stream"
FRAME, COMMANDS = "FRAME", "COMMANDS"
LOGITS, RESULT = "LOGITS", "RESULT"
START, END, CORRID = "START", "END", "CORRID"
INFO_PARAMETER = "fastsam2_info"  # JSON in the tracker's config.pbtxt: what a client needs to know


class ServerError(errors.FastSam2Error):
    """The server could not be reached, went away mid-stream, or dropped the stream."""


class SessionLimitError(errors.FastSam2Error):
    """The server holds as many sessions as --max-sessions allows."""


# the classes an error message may name; anything else arrives as a ServerError
_ERRORS = {c.__name__: c for c in (errors.InputError, errors.SourceError, errors.BundleError,
                                   errors.BackendError, errors.OutputError, errors.IncompleteInputError,
                                   ServerError, SessionLimitError)}


def error_message(exc: BaseException) -> str:
    """A server-side exception as the message the client decodes."""
    name = type(exc).__name__ if type(exc).__name__ in _ERRORS else "ServerError"
    return f"{name}: {exc}"


def decode_error(message: str) -> errors.FastSam2Error:
    name, sep, rest = message.partition(": ")
    cls = _ERRORS.get(name) if sep else None
    return cls(rest) if cls else ServerError(message)


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def dumps(obj) -> np.ndarray:
    """JSON -> a BYTES tensor of one element (numpy scalars as Python numbers: exact)."""
    return np.array([json.dumps(obj, separators=(",", ":"), default=_plain).encode()], dtype=object)


def loads(tensor) -> dict:
    item = np.asarray(tensor).reshape(-1)[0]
    return json.loads(item.decode() if isinstance(item, (bytes, bytearray)) else item)


PLACEHOLDER = np.zeros(3, np.uint8)


# -- prompts --------------------------------------------------------------------------------------
def encode_mask(mask: np.ndarray) -> dict:
    m = np.asarray(mask, bool)
    return {"shape": list(m.shape), "bits": base64.b64encode(np.packbits(m.reshape(-1))).decode()}


def decode_mask(rec: dict) -> np.ndarray:
    shape = tuple(int(v) for v in rec["shape"])
    if len(shape) != 2:
        raise errors.InputError(f"a mask prompt must be 2-D, got shape {shape}")
    bits = np.frombuffer(base64.b64decode(rec["bits"]), np.uint8)
    n = shape[0] * shape[1]
    if bits.size * 8 < n:
        raise errors.InputError("a mask prompt's bits are shorter than its shape")
    return np.unpackbits(bits)[:n].reshape(shape).astype(bool)


def prompt_op(obj: int, frame, *, points=(), neg_points=(), box=None, mask=None, text=None) -> dict:
    op = {"op": "prompt", "obj": int(obj), "frame": None if frame is None else int(frame)}
    if text is not None:
        op["text"] = str(text)
    if points:
        op["points"] = [[float(x), float(y)] for x, y in points]
    if neg_points:
        op["neg_points"] = [[float(x), float(y)] for x, y in neg_points]
    if box is not None:
        op["box"] = [float(v) for v in box]
    if mask is not None:
        op["mask"] = encode_mask(mask)
    return op


def prompt_kwargs(op: dict) -> dict:
    """A prompt op -> Session.add_prompt's keyword arguments (frame included)."""
    return {"frame": op.get("frame"), "points": [tuple(p) for p in op.get("points", ())],
            "neg_points": [tuple(p) for p in op.get("neg_points", ())],
            "box": None if op.get("box") is None else tuple(op["box"]),
            "mask": None if op.get("mask") is None else decode_mask(op["mask"]),
            "text": op.get("text")}


# -- results --------------------------------------------------------------------------------------
def encode_result(res, prompt_log: list, memory_bytes: int) -> tuple:
    """A server FrameResult -> (LOGITS array, RESULT JSON)."""
    ids = sorted(res.objects)
    if ids:
        logits = np.stack([np.asarray(res.objects[o].logits, np.float32) for o in ids])
    else:
        logits = np.zeros((0, 1, 1), np.float32)
    objects = [{"id": o, "object_score": res.objects[o].object_score, "iou": res.objects[o].iou,
                "kept_tokens": res.objects[o].kept_tokens, "prompted": res.objects[o].prompted} for o in ids]
    return logits, {"frame": res.frame, "objects": objects, "latency_ms": res.latency_ms,
                    "frame_ms": res.frame_ms, "prompt_log": prompt_log, "memory_bytes": memory_bytes}
