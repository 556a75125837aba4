"""What a bundle's manifest.json may hold: types, required keys and bounds, checked before the
runtime allocates or loads anything the manifest sizes.

The validators of json_checks composed into the manifest's and engines.json's shape, then the
checks that tie fields together (image size, token grid, text width and the graph contract must
describe one model). Every problem is one BundleError line naming the field, e.g.
`manifest.json: model.num_maskmem must be an integer in 1..64, got 100000`. Every field the
runtime reads has an entry here; fields nobody reads back are informational (Anything, or keys
an open object does not name).

Bounds are generous around what SAM2 and its export use (image size 1024, 7 memory frames, 16
object pointers), and tight enough that nothing derived from them can ask for more memory than
a device has: the largest image size (2048) gives a 16384-token grid.
"""

from __future__ import annotations

from fastsam2.runtime.contract import GRAPHS, GRAPH_ORDER, HIDDEN_DIM, MEM_DIM, geometry
from fastsam2.runtime.errors import BundleError
from fastsam2.runtime.openvino_backend import DEVICES as OPENVINO_DEVICES, OV_HINTS
# the validators and the strict JSON reader; parse_json and depth are re-exported for callers
from fastsam2.runtime.json_checks import (MAX_DEPTH, AnyOf, Anything, Bool, Enum, Int, Invalid, List,  # noqa: F401
                                          Map, Num, Obj, Opt, RelPath, Schema, Str, _show, depth,
                                          parse_json)

MAX_MANIFEST_BYTES = 1 << 20  # an exported manifest is ~12 KB
MAX_RECORD_BYTES = 256 << 10  # engines.json: a few hundred bytes
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 2048
MAX_DIM = 1 << 24  # any one tensor dimension named in a manifest
MAX_PROMPTS, MAX_PROMPT_CHARS = 10_000, 4096
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

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
# a precision variant: the file, and how it was made ("qdq", "dynamic", "hint"; runtime.precision
# reads it), besides the gate's numbers (informational)
VARIANT = Obj({**FILE_ENTRY.fields, "format": NAME}, optional=("bytes", "format"))
GRAPH = Obj({
    "file": RelPath(), "sha256": SHA256, "bytes": COUNT, "opset": Int(1, 100),
    "ops": List(Str(128), 0, 4096), "inputs": List(TENSOR, 1, 32), "outputs": List(TENSOR, 1, 32),
    "dynamic": List(Str(8), 0, 8), "export_seconds": SECONDS,
    "ort_variant": FILE_ENTRY,
    # reduced-precision variants of the graph: {precision: {"file", "sha256", ...}}
    "variants": Map(VARIANT, key=r"[a-z0-9_]{1,32}", max_items=16),
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
    # SAM2VideoPredictor's flag (false in the released configs); the tracker reads it when present
    "add_all_frames_to_correct_as_cond": Bool(),
}, optional=("memory_temporal_stride_for_eval", "add_all_frames_to_correct_as_cond"))

# how --backend openvino (and auto's order) runs the bundle: export writes the target's device,
# the precision fp32 graphs run in off the CPU, and whether auto tries OpenVINO first
OPENVINO = Obj({
    # the runtime upper-cases the name ($FASTSAM2_OPENVINO_DEVICE overrides it)
    "device": Str(8, "(?i:" + "|".join(OPENVINO_DEVICES) + ")", "one of " + ", ".join(OPENVINO_DEVICES)),
    "precision": Enum(*OV_HINTS),
    "preferred": Bool(),
}, optional=("device", "precision", "preferred"), closed=True)

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
    "openvino": OPENVINO,
    "export_seconds": SECONDS,
    "seal": SEAL,
}, optional=("sam2_version", "onnx_version", "torch_version", "k", "keep_floor", "memory_tokens",
             "precision", "openvino", "export_seconds", "seal"))


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
            # bundles exported before the objects' batch axis B have a fixed batch of 1 there
            if entry[side] not in (_io(specs, geom), _io(specs, {**geom, "B": 1})):
                raise BundleError(f"{source}: graphs.{g}.{side} do not match the graph contract at image "
                                  f"size {S} and text width {s['text_dim']}")
    check_engines(m["engines"], source)
    return geom
