"""fastsam2-run's prompt flags and prompts file -> a schedule of prompts and removals.

Every prompt flag takes an optional object id prefix and frame suffix, `[ID:]VALUE[@FRAME]`:
    --point 150,180            object 1, frame 0
    --point 230,210@6          object 1, frame 6 (a correction: frame 6 is prompted anew)
    --neg-point 2:222,264@6    object 2, negative click on frame 6
    --box 2:10,10,80,90@12     object 2 starts on frame 12 with a box
    --prompt "2:red ball@12"   object 2 starts on frame 12 from the text's most relevant token
    --remove 2@40              object 2 is dropped from frame 40 on (its memory is freed)

--prompts-file FILE holds the same schedule as JSON (PROMPTS_FILE_SCHEMA below).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from fastsam2.runtime.errors import InputError, quoted
from fastsam2.runtime.session import MAX_OBJECT_ID, PromptSpec, check_object_id
from fastsam2.runtime.track import MAX_FRAMES, Scheduled

PROMPTS_FILE_SCHEMA = """\
{
  "prompts": [                                  # applied in frame order
    {"object": 1, "frame": 0, "points": [[150, 180]]},
    {"object": 1, "frame": 6, "points": [[230, 210]], "neg_points": [[222, 264]]},
    {"object": 2, "frame": 12, "box": [10, 10, 80, 90], "text": "red ball"}
  ],
  "remove": [{"object": 2, "frame": 40}]
}
"object" defaults to 1 and "frame" to 0; coordinates are input pixels; "text" must be one of
the bundle's prompts; each prompt needs points, neg_points, a box or a text."""

MAX_SHOWN = 60  # characters of a user's value repeated in an error message
MAX_PROMPTS_FILE = 4 << 20  # bytes read at most: a FIFO or /dev/zero has no size to check first
_INT = re.compile(r"\s*[+-]?\d+\s*$")


def shorten(text, limit: int = MAX_SHOWN) -> str:
    return quoted(text, limit)


def _small_int(text: str, top: int):
    """int(text) for an _INT match, or None past `top`: decided on the digits first, since
    int() of more than 4300 digits raises."""
    digits = text.strip().lstrip("+-").lstrip("0")
    if len(digits) > len(str(top)):
        return None
    n = int(text)
    return n if n <= top else None


def _split_frame(value: str, flag: str, strict: bool) -> tuple:
    """"230,210@6" -> ("230,210", 6); no suffix -> frame 0. A text keeps an "@" that is not
    followed by a frame number (strict=False)."""
    head, sep, tail = value.rpartition("@")
    if not sep:
        return value, 0
    if not _INT.match(tail):
        if strict:
            raise InputError(f"{flag} {shorten(value)}: the frame after '@' must be a number, got {shorten(tail)}")
        return value, 0
    if tail.strip().startswith("-") and tail.strip().lstrip("-0"):
        raise InputError(f"{flag} {shorten(value)}: frame {shorten(tail.strip(), 20)} is negative")
    frame = _small_int(tail, MAX_FRAMES - 1)
    if frame is None:
        raise InputError(f"{flag} {shorten(value)}: frame {shorten(tail.strip(), 20)} is past the last frame a run "
                         f"can reach ({MAX_FRAMES - 1})")
    return head, frame


def _split_id(value: str, flag: str, strict: bool) -> tuple:
    """"2:300,120" -> (2, "300,120"); no "ID:" prefix -> object 1. For a text (strict=False)
    only a number before the first ':' is an id."""
    head, sep, rest = value.partition(":")
    if not sep:
        return 1, value
    if _INT.match(head):
        return _object_id(head, flag, value), rest
    if strict:
        raise InputError(f"{flag} {shorten(value)}: object id {shorten(head.strip())} is not valid: "
                         f"ids are integers 1..{MAX_OBJECT_ID}")
    return 1, value


def _object_id(text: str, flag: str, value: str) -> int:
    obj = _small_int(text, 10**9)  # a small number out of range: check_object_id's own message
    if obj is None:
        raise InputError(f"{flag} {shorten(value)}: object id {shorten(text.strip(), 20)} is not valid: "
                         f"ids are integers 1..{MAX_OBJECT_ID}")
    return check_object_id(obj)


def _numbers(text: str, n: int, flag: str, value: str) -> tuple:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n or not all(v == v and abs(v) != float("inf") for v in vals):
        what = "x,y" if n == 2 else "x0,y0,x1,y1"
        raise InputError(f"{flag} must be [ID:]{what}[@FRAME] ({n} numbers), got {shorten(value)}")
    return vals


class ScheduleBuilder:
    """Collects prompts per (frame, object), merging what one frame gives one object."""

    def __init__(self):
        self.specs: dict = {}  # (frame, obj) -> PromptSpec
        self.removals: list = []  # (frame, obj)

    def spec(self, frame: int, obj: int) -> PromptSpec:
        return self.specs.setdefault((frame, obj), PromptSpec())

    def add_text(self, frame, obj, text, what="--prompt values"):
        s = self.spec(frame, obj)
        if s.text is not None:
            raise InputError(f"object {obj} has two {what} on frame {frame}; give one text per object")
        if not text.strip():
            raise InputError(f"object {obj}: the text prompt on frame {frame} is empty")
        s.text = text

    def add_box(self, frame, obj, box, what="--box values"):
        s = self.spec(frame, obj)
        if s.box is not None:
            raise InputError(f"object {obj} has two {what} on frame {frame}; give one box per object")
        s.box = box

    def schedule(self) -> list:
        for (f, o), s in self.specs.items():  # many small prompts merged are one big one
            s.check_size(f"object {o} on frame {f}")
        items = [Scheduled(f, o, s) for (f, o), s in self.specs.items()]
        return items + [Scheduled(f, o, None) for f, o in self.removals]


def schedule_from_flags(prompts=(), points=(), neg_points=(), boxes=(), removes=(),
                        builder: ScheduleBuilder | None = None) -> ScheduleBuilder:
    b = builder or ScheduleBuilder()
    for value in prompts:
        rest, frame = _split_frame(value, "--prompt", strict=False)
        obj, text = _split_id(rest, "--prompt", strict=False)
        b.add_text(frame, obj, text)
    for flag, values, field in (("--point", points, "points"), ("--neg-point", neg_points, "neg_points")):
        for value in values:
            rest, frame = _split_frame(value, flag, strict=True)
            obj, xy = _split_id(rest, flag, strict=True)
            getattr(b.spec(frame, obj), field).append(_numbers(xy, 2, flag, value))
    for value in boxes:
        rest, frame = _split_frame(value, "--box", strict=True)
        obj, box = _split_id(rest, "--box", strict=True)
        b.add_box(frame, obj, _numbers(box, 4, "--box", value))
    for value in removes:
        rest, sep, tail = value.rpartition("@")
        if not sep:
            raise InputError(f"--remove must be ID@FRAME, got {shorten(value)}")
        _, frame = _split_frame(value, "--remove", strict=True)
        if not _INT.match(rest):
            raise InputError(f"--remove {shorten(value)}: object id {shorten(rest)} is not valid: "
                             f"ids are integers 1..{MAX_OBJECT_ID}")
        b.removals.append((frame, _object_id(rest, "--remove", value)))
    return b


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise InputError(f"{where}: {what}")


def _xy_list(v, where, n):
    _expect(isinstance(v, list) and len(v) <= 1000, where, "must be a list of [x, y] pairs")
    out = []
    for p in v:
        xy = tuple(_finite(x) for x in p) if isinstance(p, list) and len(p) == n else ()
        _expect(len(xy) == n and None not in xy, where, f"each entry must be {n} numbers, got {shorten(json.dumps(p))}")
        out.append(xy)
    return out


def _finite(x):
    """x as a finite float, or None (an int of 400 digits does not fit a float: OverflowError)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        x = float(x)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def schedule_from_file(path, builder: ScheduleBuilder | None = None) -> ScheduleBuilder:
    """--prompts-file: the schedule as JSON (PROMPTS_FILE_SCHEMA)."""
    b = builder or ScheduleBuilder()
    p = Path(path)
    try:
        with open(p, "rb") as f:  # a pipe, a FIFO or a device: only what the cap allows is read
            raw = f.read(MAX_PROMPTS_FILE + 1)
        if len(raw) > MAX_PROMPTS_FILE:
            raise InputError(f"prompts file {p} is larger than {MAX_PROMPTS_FILE >> 20} MB")
        data = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise InputError(f"cannot read prompts file {p}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise InputError(f"prompts file {p} is not JSON: {shorten(str(e), 120)}") from None
    _expect(isinstance(data, dict) and set(data) <= {"prompts", "remove"}, str(p),
            'must be an object with "prompts" (and optionally "remove") lists')
    prompts, removes = data.get("prompts", []), data.get("remove", [])
    _expect(isinstance(prompts, list) and isinstance(removes, list), str(p), '"prompts" and "remove" must be lists')
    keys = {"object", "frame", "points", "neg_points", "box", "text"}
    for i, e in enumerate(prompts):
        where = f"{p} prompts[{i}]"
        _expect(isinstance(e, dict), where, "must be an object")
        _expect(set(e) <= keys, where, f"unknown keys {sorted(set(e) - keys)}; allowed: {sorted(keys)}")
        obj, frame = _obj_frame(e, where)
        spec = b.spec(frame, obj)
        if "points" in e:
            spec.points += _xy_list(e["points"], where + ".points", 2)
        if "neg_points" in e:
            spec.neg_points += _xy_list(e["neg_points"], where + ".neg_points", 2)
        if "box" in e:
            box = _xy_list([e["box"]], where + ".box", 4)[0]
            b.add_box(frame, obj, box, what="boxes")
        if "text" in e:
            _expect(isinstance(e["text"], str), where, '"text" must be a string')
            b.add_text(frame, obj, e["text"], what="texts")
        _expect(any(k in e for k in ("points", "neg_points", "box", "text")), where,
                "needs points, neg_points, a box or a text")
    for i, e in enumerate(removes):
        where = f"{p} remove[{i}]"
        _expect(isinstance(e, dict) and set(e) <= {"object", "frame"} and "object" in e and "frame" in e,
                where, 'must be {"object": ID, "frame": FRAME}')
        obj, frame = _obj_frame(e, where)
        b.removals.append((frame, obj))
    return b


def _obj_frame(e: dict, where: str) -> tuple:
    obj, frame = e.get("object", 1), e.get("frame", 0)
    _expect(isinstance(frame, int) and not isinstance(frame, bool) and 0 <= frame < MAX_FRAMES, where,
            f'"frame" must be an integer in 0..{MAX_FRAMES - 1}, got {shorten(json.dumps(frame))}')
    if not (isinstance(obj, int) and not isinstance(obj, bool) and 1 <= obj <= MAX_OBJECT_ID):
        text = json.dumps(obj)
        shown = text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"
        raise InputError(f"{where}: object id {shown} is not valid: ids are integers 1..{MAX_OBJECT_ID}")
    return check_object_id(obj), frame
