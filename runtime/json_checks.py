# Hand-written rather than msgspec or fastjsonschema: their errors drop the value, one of the two bounds and an enum's or union's choices (msgspec 0.23: +12-28 ms import, 0.65 MB; fastjsonschema: +90-160 ms compiling the manifest schema per process, 0.24 MB; ~110 validator lines saved, the schema and cross-field checks stay)
"""Strict JSON and the small validators a bundle's JSON files are checked with.

Each validator checks one value and raises Invalid naming where it sits, the bounds and the
value (`model.num_maskmem must be an integer in 1..64, got 100000`); manifest_schema composes
them into the manifest's and engines.json's shape.
`parse_json` reads at most a given number of bytes of strict JSON (no NaN, no float overflow,
bounded nesting) so nothing later walks or allocates more than the file allowed.
"""

from __future__ import annotations

import json
import math
import re

from fastsam2.runtime.errors import BundleError

MAX_DEPTH = 16  # the manifest nests 7 levels deep (engines.profile_shapes.<graph>.<input>[i][j])


def _show(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class Invalid(Exception):
    def __init__(self, where: str, problem: str):
        super().__init__(f"{where} {problem}")


class Schema:
    def check(self, v, where: str) -> None:
        raise NotImplementedError


class Int(Schema):
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def check(self, v, where):
        # bool is an int in Python; JSON's true is not a count
        if not (isinstance(v, int) and not isinstance(v, bool) and self.lo <= v <= self.hi):
            raise Invalid(where, f"must be an integer in {self.lo}..{self.hi}, got {_show(v)}")


class Num(Schema):
    def __init__(self, lo: float, hi: float, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def check(self, v, where):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > self.lo if self.lo_open else v >= self.lo) and v <= self.hi
        if not ok:
            rng = f"({self.lo}, {self.hi}]" if self.lo_open else f"[{self.lo}, {self.hi}]"
            raise Invalid(where, f"must be a number in {rng}, got {_show(v)}")


class Bool(Schema):
    def check(self, v, where):
        if not isinstance(v, bool):
            raise Invalid(where, f"must be true or false, got {_show(v)}")


class Str(Schema):
    _CONTROL = re.compile(r"[\x00-\x1f\x7f]")

    def __init__(self, max_len: int = 256, pattern: str | None = None, what: str = "a string"):
        self.max_len, self.what = max_len, what
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, v, where):
        ok = isinstance(v, str) and 0 < len(v) <= self.max_len and not self._CONTROL.search(v)
        if ok and self.pattern is not None:
            ok = self.pattern.fullmatch(v) is not None
        if not ok:
            raise Invalid(where, f"must be {self.what} (at most {self.max_len} characters), got {_show(v)}")


class RelPath(Str):
    """A file name inside the bundle, as the manifest spells it. Where it points once links are
    followed is checked against the folder itself (bundle_files.resolve_inside)."""

    def __init__(self):
        super().__init__(512, r"[A-Za-z0-9._-][A-Za-z0-9._/-]*", "a relative path inside the bundle")

    def check(self, v, where):
        super().check(v, where)
        if any(part in ("", ".", "..") for part in v.split("/")):
            raise Invalid(where, f"must be a relative path inside the bundle, got {_show(v)}")


class Enum(Schema):
    def __init__(self, *values):
        self.values = values

    def check(self, v, where):
        # `1 == True` in Python: compare types too
        if not any(type(v) is type(x) and v == x for x in self.values):
            raise Invalid(where, f"must be one of {', '.join(_show(x) for x in self.values)}, got {_show(v)}")


class Opt(Schema):
    """The value or null."""

    def __init__(self, inner: Schema):
        self.inner = inner

    def check(self, v, where):
        if v is not None:
            self.inner.check(v, where)


class AnyOf(Schema):
    def __init__(self, *options: Schema, what: str):
        self.options, self.what = options, what

    def check(self, v, where):
        for o in self.options:
            try:
                o.check(v, where)
                return
            except Invalid:
                continue
        raise Invalid(where, f"must be {self.what}, got {_show(v)}")


class Anything(Schema):
    """Informational fields nothing reads back (bounded by MAX_DEPTH and the file size)."""

    def check(self, v, where):
        pass


class List(Schema):
    def __init__(self, item: Schema, min_len: int = 0, max_len: int = 1024):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def check(self, v, where):
        if not isinstance(v, list):
            raise Invalid(where, f"must be a list, got {_show(v)}")
        if not self.min_len <= len(v) <= self.max_len:
            raise Invalid(where, f"must hold {self.min_len}..{self.max_len} items, got {len(v)}")
        for i, x in enumerate(v):
            self.item.check(x, f"{where}[{i}]")


class Obj(Schema):
    """A JSON object: `fields` it may hold (all required unless in `optional`); unknown keys are
    allowed (informational) unless `closed`, and are then checked against `extra`."""

    def __init__(self, fields: dict, optional=(), closed: bool = False, extra: Schema | None = None):
        self.fields, self.optional, self.closed, self.extra = fields, set(optional), closed, extra

    def check(self, v, where):
        if not isinstance(v, dict):
            raise Invalid(where, f"must be an object, got {_show(v)}")
        for k, schema in self.fields.items():
            if k in v:
                schema.check(v[k], f"{where}.{k}" if where else k)
            elif k not in self.optional:
                raise Invalid(f"{where}.{k}" if where else k, "is missing")
        for k in v:
            if k not in self.fields:
                if self.closed:
                    raise Invalid(where or "manifest", f"has an unexpected key {_show(k)}")
                if self.extra is not None:
                    self.extra.check(v[k], f"{where}.{k}" if where else k)


class Map(Schema):
    """{name: value} with names matching `key` and at most `max_items` entries."""

    def __init__(self, value: Schema, key: str = r"[A-Za-z0-9_.-]{1,64}", max_items: int = 64):
        self.value, self.key, self.max_items = value, re.compile(key), max_items

    def check(self, v, where):
        if not isinstance(v, dict):
            raise Invalid(where, f"must be an object, got {_show(v)}")
        if len(v) > self.max_items:
            raise Invalid(where, f"must hold at most {self.max_items} entries, got {len(v)}")
        for k, x in v.items():
            if not self.key.fullmatch(k):
                raise Invalid(where, f"has a key that is not a name: {_show(k)}")
            self.value.check(x, f"{where}.{k}")


def depth(v) -> int:
    """Nesting depth of a parsed JSON value, without recursion (it may be hostile)."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            return d
        if isinstance(x, dict):
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x)
    return deepest


def _no_constant(name):
    raise ValueError(f"{name} is not a number in strict JSON")


def _finite_float(text):
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:20]} is out of range")
    return v


def parse_json(raw: bytes, source: str, limit: int) -> object:
    """Strict JSON (no NaN/Infinity, no number that overflows a float) from at most `limit`
    bytes; any problem is one BundleError line naming `source`."""
    if len(raw) > limit:
        raise BundleError(f"{source} is larger than the {limit} bytes it may hold")
    try:
        v = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise BundleError(f"{source} is not UTF-8 text") from None
    except RecursionError:
        raise BundleError(f"{source} nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, our hooks, and Python's int-digit limit
        raise BundleError(f"{source} is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    if depth(v) > MAX_DEPTH:
        raise BundleError(f"{source} nests deeper than {MAX_DEPTH} levels")
    return v
