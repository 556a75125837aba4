"""What a bundle's manifest.json may hold: types, required keys and bounds, checked before the
runtime allocates or loads anything the manifest sizes.

Hand-written (no jsonschema dependency on the device): a handful of validators composed into
the manifest's and engines.json's shape, then the checks that tie fields together (image size,
token grid, text width and the graph contract must describe one model). Every problem is one
BundleError line naming the field, e.g. `manifest.json: model.num_maskmem must be an integer in
1..64, got 100000`.

Bounds are generous around what SAM2 and its export use (image size 1024, 7 memory frames, 16
object pointers), and tight enough that nothing derived from them can ask for more memory than
a device has: the largest image size (2048) gives a 16384-token grid.
"""

from __future__ import annotations

import json
import math
import re

from fastsam2.runtime.contract import GRAPHS, GRAPH_ORDER, HIDDEN_DIM, MEM_DIM, geometry
from fastsam2.runtime.errors import BundleError

MAX_MANIFEST_BYTES = 1 << 20  # an exported manifest is ~12 KB
MAX_RECORD_BYTES = 256 << 10  # engines.json: a few hundred bytes
MAX_DEPTH = 16  # the manifest nests 7 levels deep (engines.profile_shapes.<graph>.<input>[i][j])
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 2048
MAX_DIM = 1 << 24  # any one tensor dimension named in a manifest
MAX_PROMPTS, MAX_PROMPT_CHARS = 10_000, 4096
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


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


SHA256 = Str(64, r"[0-9a-f]{64}", "a sha256 hex digest")
NAME = Str(64, r"[A-Za-z0-9][A-Za-z0-9._-]*", "a name (letters, digits, . _ -)")
COUNT = Int(0, 1 << 40)
SECONDS = Num(0, 1e9)
VERSION = Opt(Str(64))
SHAPE = List(Int(0, MAX_DIM), 0, 8)

TENSOR = Obj({"name": Str(64, r"[A-Za-z_][A-Za-z0-9_]*", "a tensor name"),
              "dtype": Enum("float32", "float16", "int64", "int32", "bool"),
              "shape": List(AnyOf(Int(0, MAX_DIM), Str(8, r"[A-Za-z][A-Za-z0-9]*"),
                                  what="a dimension (an integer or a symbol)"), 0, 8)})
FILE_ENTRY = Obj({"file": RelPath(), "sha256": SHA256, "bytes": COUNT}, optional=("bytes",))
GRAPH = Obj({
    "file": RelPath(), "sha256": SHA256, "bytes": COUNT, "opset": Int(1, 100),
    "ops": List(Str(128), 0, 4096), "inputs": List(TENSOR, 1, 32), "outputs": List(TENSOR, 1, 32),
    "dynamic": List(Str(8), 0, 8), "export_seconds": SECONDS,
    "ort_variant": FILE_ENTRY,
    # reduced-precision variants of the graph: {precision: {"file", "sha256", ...}}
    "variants": Map(FILE_ENTRY, key=r"[a-z0-9_]{1,32}", max_items=16),
}, optional=("bytes", "opset", "ops", "dynamic", "export_seconds", "ort_variant", "variants"))

MODEL = Obj({
    "image_size": Int(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    "num_maskmem": Int(1, 64),
    "max_obj_ptrs_in_encoder": Int(1, 256),
    "hidden_dim": Enum(HIDDEN_DIM),  # the graph contract's widths
    "mem_dim": Enum(MEM_DIM),
    **{k: Bool() for k in (
        "directly_add_no_mem_embed", "use_obj_ptrs_in_encoder", "add_tpos_enc_to_obj_ptrs",
        "proj_tpos_enc_in_obj_ptrs", "use_signed_tpos_enc_to_obj_ptrs",
        "only_obj_ptrs_in_the_past_for_eval", "pred_obj_scores", "fixed_no_obj_ptr", "soft_no_obj_ptr",
        "multimask_output_in_sam", "multimask_output_for_tracking", "use_multimask_token_for_obj_ptr",
        "dynamic_multimask_via_stability", "binarize_mask_from_pts_for_mem_enc")},
    "multimask_min_pt_num": Int(0, 1024),
    "multimask_max_pt_num": Int(0, 1024),
    "dynamic_multimask_stability_delta": Num(0, 1e3),
    "dynamic_multimask_stability_thresh": Num(-1e3, 1e3),
    "memory_temporal_stride_for_eval": Int(1, 1000),
    "image_mean": List(Num(-1e3, 1e3), 3, 3),
    # divided by: zero or a denormal would turn every frame into inf
    "image_std": List(Num(1e-6, 1e3), 3, 3),
    "text_dim": Int(1, 4096),
}, optional=("memory_temporal_stride_for_eval",))

ENGINE_GRAPH = Obj({"file": RelPath(), "sha256": SHA256, "build_seconds": SECONDS},
                   optional=("sha256", "build_seconds"))
ENGINES = Obj({
    "target": NAME, "built": Bool(), "keep_range": List(Num(0, 1, lo_open=True), 2, 2),
    "precision": Enum(*PRECISIONS), "workspace_mib": Int(0, 1 << 24),
    "builder_optimization_level": Int(0, 5), "dla_core": Int(-1, 15), "max_points": Int(1, 4096),
    "profile_shapes": Map(Map(List(SHAPE, 3, 3))), "build_plan": RelPath(),
    "gpu_name": Opt(Str(256)), "compute_capability": Opt(Str(16)), "tensorrt_version": VERSION,
    "graphs": Map(ENGINE_GRAPH), "source": Str(64), "checks": Anything(),
}, optional=("target", "built", "keep_range", "precision", "workspace_mib", "builder_optimization_level",
             "dla_core", "max_points", "profile_shapes", "build_plan", "gpu_name", "compute_capability",
             "tensorrt_version", "graphs", "source", "checks"))
# what `python3 -m fastsam2.runtime.record_engines` writes: engines.json may say nothing else
RECORD_KEYS = ("target", "built", "gpu_name", "compute_capability", "tensorrt_version", "source", "graphs")

SEAL = Obj({"format": Enum(1), "files": Map(SHA256, key=r"[A-Za-z0-9._/-]{1,512}", max_items=4096),
            "sha256": SHA256}, closed=True)

MANIFEST = Obj({
    "format": Enum(1),
    "fastsam2_version": Str(64),
    "sam2_version": VERSION, "onnx_version": VERSION, "torch_version": VERSION,
    "config": Str(64),
    "checkpoint": Obj({"file": Opt(Str(255)), "sha256": AnyOf(SHA256, Enum("random"), what="a sha256 or 'random'"),
                       "seed": Opt(Int(-(1 << 63), (1 << 64) - 1))}, optional=("file", "seed")),
    "weights_random": Bool(),
    "image_size": Int(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    "token_grid": List(Int(1, MAX_IMAGE_SIZE // 16), 2, 2),
    "keep": AnyOf(Num(0, 1, lo_open=True), Enum("auto"), what="a keep ratio in (0, 1] or 'auto'"),
    "k": Opt(Int(1, (MAX_IMAGE_SIZE // 16) ** 2)),
    "keep_floor": Int(1, (MAX_IMAGE_SIZE // 16) ** 2),
    # informational: the profile name or TOML path given to fastsam2-export (never opened)
    "target": Str(1024),
    "opset": Int(7, 100),
    "model": MODEL,
    "memory_tokens": Map(List(Int(0, 1 << 30), 2, 2), max_items=8),
    "graphs": Map(GRAPH, max_items=32),
    "constants": FILE_ENTRY,
    "text": Obj({"file": RelPath(), "sha256": SHA256, "dim": Int(1, 4096), "model": Opt(Str(256)),
                 "random": Opt(Bool())}, optional=("dim", "model", "random")),
    "prompts": List(Str(MAX_PROMPT_CHARS), 0, MAX_PROMPTS),
    "router_trained": Bool(),
    "engines": ENGINES,
    # the precision each graph runs in on CPU backends: {graph: "fp32" | "bf16" | "int8"}
    "precision": Map(Str(16, r"[a-z0-9]+", "a precision name"), max_items=32),
    "export_seconds": SECONDS,
    "seal": SEAL,
}, optional=("sam2_version", "onnx_version", "torch_version", "k", "keep_floor", "memory_tokens",
             "precision", "export_seconds", "seal"))


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


def _check(schema: Schema, v, source: str, where: str = "") -> None:
    try:
        schema.check(v, where)
    except Invalid as e:
        raise BundleError(f"{source}: {e}") from None


def check_engines(info, source: str) -> None:
    """manifest["engines"], or what engines.json adds to it."""
    _check(ENGINES, info, source, "engines")
    for g in info.get("graphs", {}):
        if g not in GRAPHS:
            raise BundleError(f"{source}: engines.graphs names an unknown graph {_show(g)}")
    if info.get("built") and info.get("graphs") is not None and set(info["graphs"]) != set(GRAPH_ORDER):
        raise BundleError(f"{source}: engines.graphs must list the engines of {', '.join(GRAPH_ORDER)}")
    lo_hi = info.get("keep_range")
    if lo_hi and lo_hi[0] > lo_hi[1]:
        raise BundleError(f"{source}: engines.keep_range must be [low, high], got {_show(lo_hi)}")
    for g, inputs in info.get("profile_shapes", {}).items():
        spec = GRAPHS.get(g)
        if spec is None:
            raise BundleError(f"{source}: engines.profile_shapes names an unknown graph {_show(g)}")
        ranks = {t.name: len(t.shape) for t in spec.inputs}
        for name, shapes in inputs.items():
            if name not in ranks or any(len(s) != ranks[name] for s in shapes):
                raise BundleError(f"{source}: engines.profile_shapes.{g}.{name} does not fit the graph's "
                                  "inputs")


def _io(specs, dims) -> list:
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.resolve(dims))} for t in specs]


def validate_manifest(m, source: str = "manifest.json") -> dict:
    """Check a parsed manifest's shape and bounds, then that its sizes describe one model: the
    token grid of its image size, the text width of its embeddings, and for every graph the
    inputs and outputs of the graph contract at that geometry. Returns the geometry."""
    if not isinstance(m, dict):
        raise BundleError(f"{source} must hold a JSON object, got {_show(m)}")
    _check(MANIFEST, m, source)
    missing = [g for g in GRAPH_ORDER if g not in m["graphs"]]
    if missing:
        raise BundleError(f"{source}: the bundle lacks graphs: {', '.join(missing)}")
    S, s = m["image_size"], m["model"]
    if S % 16:
        raise BundleError(f"{source}: image_size must be a multiple of 16, got {S}")
    if s["image_size"] != S:
        raise BundleError(f"{source}: model.image_size {s['image_size']} differs from image_size {S}")
    geom = geometry(S, s["text_dim"])
    if m["token_grid"] != [geom["G"], geom["G"]]:
        raise BundleError(f"{source}: token_grid must be [{geom['G']}, {geom['G']}] at image size {S}, "
                          f"got {_show(m['token_grid'])}")
    if m.get("k") is not None and m["k"] > geom["T"]:
        raise BundleError(f"{source}: k must be at most the {geom['T']} tokens of a frame, got {m['k']}")
    if m["text"].get("dim", s["text_dim"]) != s["text_dim"]:
        raise BundleError(f"{source}: text.dim {m['text']['dim']} differs from model.text_dim {s['text_dim']}")
    if s["multimask_min_pt_num"] > s["multimask_max_pt_num"]:
        raise BundleError(f"{source}: model.multimask_min_pt_num exceeds multimask_max_pt_num")
    for g in GRAPH_ORDER:
        spec, entry = GRAPHS[g], m["graphs"][g]
        for side, specs in (("inputs", spec.inputs), ("outputs", spec.outputs)):
            if entry[side] != _io(specs, geom):
                raise BundleError(f"{source}: graphs.{g}.{side} do not match the graph contract at image "
                                  f"size {S} and text width {s['text_dim']}")
    check_engines(m["engines"], source)
    return geom
