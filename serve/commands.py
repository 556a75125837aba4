# Hand-written rather than msgspec/fastjsonschema: one plain line per refusal (the words tests and clients see) and the mask's base64 bounded by its shape before decoding (msgspec measured: +11.6 ms import, 724 KB, and its refusals read "Expected `int` >= 1 - at `$.obj`")
"""The server's limits and the COMMANDS a client sends, checked before anything acts on them.

Everything a request carries comes from a client nobody vouched for: a malformed command (not
JSON, wrong types, missing keys, bad base64) or one over a limit is an InputError with one line
back to that client, never a traceback in the server's log, and nothing is allocated from a size
the client declared before the size is known to be within the limits below (docs/serving.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import numbers

from fastsam2.runtime.errors import InputError

MAX_FRAME_SIDE = 4096  # px per side: 4K cameras fit; an 8000x8000 frame is refused, not processed
MAX_OBJECTS = 32  # objects tracked or scheduled per stream (each costs a memory bank and a decoder run)
MAX_POINTS = 64  # clicks per prompt (box corners not counted), as the local runtime's cap
MAX_COND_FRAMES = 16  # conditioning frames attended per object (each is T tokens of memory)
MAX_OPS = 256  # prompts/removals carried by one request
MAX_FRAMES = 10 ** 9  # a stream's declared length
MAX_TEXT = 4096  # characters of a text prompt
MAX_COMMAND_BYTES = 8 << 20  # one request's JSON (a full-size mask prompt packs to ~2 MB, ~2.8 in base64)
OPTIONS = ("keep", "fill", "num_frames", "frame_size", "max_cond_frames")
MAX_TOKEN = 64  # characters of a stream token (the server makes 32)
OPS = ("open", "push", "correct", "close")


def _bad(what: str, v) -> InputError:
    r = repr(v)
    return InputError(f"{what}, got {r if len(r) <= 40 else r[:40] + '...'}")


def _int(v, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{what} must be an integer {lo}..{hi}", v)
    return v


def _num(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise _bad(f"{what} must be a finite number", v)
    return float(v)


def _list(v, lo: int, hi: int, what: str) -> list:
    if not isinstance(v, list) or not lo <= len(v) <= hi:
        raise InputError(f"{what} must be a list of {lo}..{hi} items"
                         + (f", got {len(v)}" if isinstance(v, list) else f", got {type(v).__name__}"))
    return v


def _dict(v, what: str, keys: tuple) -> dict:
    if not isinstance(v, dict):
        raise _bad(f"{what} must be a JSON object", v)
    extra = sorted(set(v) - set(keys))
    if extra:
        raise InputError(f"{what} has an unknown key {extra[0][:40]!r} (known: {', '.join(keys)})")
    return v


def frame_shape(v, what: str = "a frame") -> tuple:
    """[height, width] of a pushed frame (or a mask), each 2..MAX_FRAME_SIDE."""
    h, w = (_int(s, 0, 2 ** 62, f"{what}'s sides") for s in _list(v, 2, 2, f"{what}'s shape [height, width]"))
    if not (2 <= h <= MAX_FRAME_SIDE and 2 <= w <= MAX_FRAME_SIDE):
        raise InputError(f"{what} is {w}x{h}: this server takes 2..{MAX_FRAME_SIDE} px a side "
                         f"(downscale larger frames)")
    return h, w


def _options(v) -> dict:
    o = _dict(v if v is not None else {}, "open options", OPTIONS)
    keep = o.get("keep")
    if keep is not None and keep != "auto":
        _num(keep, "keep")
    if o.get("fill") is not None and not isinstance(o["fill"], str):
        raise _bad("fill must be a string", o["fill"])
    if o.get("num_frames") is not None:
        _int(o["num_frames"], 1, MAX_FRAMES, "num_frames")
    if o.get("frame_size") is not None:
        w, h = (_int(s, 2, MAX_FRAME_SIDE, f"frame_size's sides (px, at most {MAX_FRAME_SIDE})")
                for s in _list(o["frame_size"], 2, 2, "frame_size [width, height]"))
    if o.get("max_cond_frames") is not None:
        _int(o["max_cond_frames"], 1, MAX_COND_FRAMES, "max_cond_frames (the server's limit)")
    return o


def _points(v, what: str) -> list:
    return [[_num(c, what) for c in _list(p, 2, 2, f"each of {what}")]
            for p in _list(v, 0, MAX_POINTS, f"{what} (at most {MAX_POINTS} per prompt)")]


def _mask(v) -> dict:
    m = _dict(v, "a mask prompt", ("shape", "bits"))
    if "shape" not in m or "bits" not in m:
        raise InputError("a mask prompt needs 'shape' and 'bits'")
    h, w = frame_shape(m["shape"], "a mask prompt")
    if not isinstance(m["bits"], str) or len(m["bits"]) > 4 * ((h * w + 7) // 8 + 2) // 3 + 4:
        raise InputError(f"a mask prompt's bits must be base64 of {(h * w + 7) // 8} bytes")
    try:
        bits = base64.b64decode(m["bits"], validate=True)
    except (binascii.Error, ValueError):
        raise InputError("a mask prompt's bits are not valid base64") from None
    if len(bits) != (h * w + 7) // 8:
        raise InputError(f"a mask prompt's bits hold {len(bits)} bytes, its {w}x{h} shape needs {(h * w + 7) // 8}")
    return m


def _op(v, allowed: tuple) -> dict:
    kind = v.get("op") if isinstance(v, dict) else None
    if kind not in allowed:
        raise _bad(f"each prompt op must be an object with op one of {', '.join(allowed)}", v)
    keys = ("op", "obj", "frame") + (("text", "points", "neg_points", "box", "mask") if kind == "prompt" else ())
    o = _dict(v, f"a {kind} op", keys)
    if "obj" not in o:
        raise InputError(f"a {kind} op needs 'obj'")
    _int(o["obj"], 1, 254, "obj (an object id)")
    if o.get("frame") is not None:
        _int(o["frame"], 0, MAX_FRAMES, "an op's frame")
    if kind == "prompt":
        if o.get("text") is not None and (not isinstance(o["text"], str) or len(o["text"]) > MAX_TEXT):
            raise _bad(f"text must be a string of at most {MAX_TEXT} characters", o["text"])
        for k in ("points", "neg_points"):
            if o.get(k) is not None:
                _points(o[k], k)
        if o.get("box") is not None:
            [_num(c, "a box's corner") for c in _list(o["box"], 4, 4, "box [x0, y0, x1, y1]")]
        if o.get("mask") is not None:
            _mask(o["mask"])
    return o


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(raw) -> dict:
    """One COMMANDS element (bytes) -> the checked command dict."""
    if not isinstance(raw, (bytes, bytearray, str)):
        raise InputError("COMMANDS must hold one JSON string")
    if len(raw) > MAX_COMMAND_BYTES:
        raise InputError(f"COMMANDS is {len(raw)} bytes, over the server's {MAX_COMMAND_BYTES}")
    try:
        cmd = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(f"COMMANDS is not JSON: {str(e)[:80]}") from None
    if not isinstance(cmd, dict):
        raise _bad("COMMANDS must be a JSON object", cmd)
    op = cmd.get("op", "push")
    if op not in OPS:
        raise _bad(f"op must be one of {', '.join(OPS)}", op)
    keys = {"open": ("op", "options", "resume"), "push": ("op", "ops", "timestamp", "shape", "token", "seq"),
            "correct": ("op", "ops", "token", "seq"), "close": ("op", "token", "seq")}[op]
    _dict(cmd, f"a {op} command", keys)
    if op != "open" and not isinstance(cmd.get("token"), str):
        raise InputError(f"a {op} command needs the stream's token (the open reply's 'token')")
    if cmd.get("seq") is not None:
        _int(cmd["seq"], 1, 2 ** 62, "seq (the client's request number)")
    if op == "open":
        cmd["options"] = _options(cmd.get("options"))
        if cmd.get("resume") is not None:
            r = _dict(cmd["resume"], "resume", ("token",))
            if not isinstance(r.get("token"), str) or not 0 < len(r["token"]) <= MAX_TOKEN:
                raise _bad(f"resume needs the stream's token (at most {MAX_TOKEN} characters)", r.get("token"))
    if op in ("push", "correct"):
        ops = _list(cmd.get("ops") or [], 0 if op == "push" else 1, MAX_OPS, "ops")
        cmd["ops"] = [_op(o, ("prompt", "remove") if op == "push" else ("prompt",)) for o in ops]
    if op == "push":
        if "shape" not in cmd:
            raise InputError("a push command needs the frame's 'shape' [height, width]")
        cmd["shape"] = frame_shape(cmd["shape"])
        if cmd.get("timestamp") is not None:
            _num(cmd["timestamp"], "timestamp")
    return cmd
