"""The graph contract: names, dtypes, shapes and dynamic axes of the five graphs.

Declared once, here, and used by the exporter (ONNX names and dynamic axes), the parity tests
(inputs of the right shapes, tolerances), the TensorRT profile/build plan (min/opt/max shapes)
and the runtime (what to feed). Shapes use symbols resolved from the model geometry:

    S  image size (1024 for official SAM2)      G  token grid side, S // 16
    T  tokens per frame, G * G                  D  text embedding width (512 for ViT-B-32)
    N  query tokens kept by the router          M  memory tokens (spatial + 4 per object pointer)
    Ms spatial memory tokens                    P  prompt points (a box counts as two)
    B  objects in one call (router, mask decoder, memory encoder: a frame's objects as the batch;
       the image features and the decoder's high-resolution features stay one and broadcast)
"""

from __future__ import annotations

from dataclasses import dataclass, field

HIDDEN_DIM = 256  # SAM2 d_model
MEM_DIM = 64  # SAM2 memory channels
PTR_TOKENS = HIDDEN_DIM // MEM_DIM  # an object pointer is split into this many memory tokens
NUM_MASK_TOKENS = 4  # mask token 0 = single mask, 1..3 = multimask
DEFAULT_KEEP_RANGE = (0.3, 1.0)  # where --keep auto adapts when the engines name no range
MAX_BATCH = 8  # objects per batched call: the largest B of the engines' optimisation profiles


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints or symbol names

    def resolve(self, dims: dict) -> tuple:
        """Concrete shape, with symbols taken from `dims` (symbols missing there stay names)."""
        return tuple(dims.get(d, d) if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple
    outputs: tuple
    # symbols that are dynamic at run time (everything else is fixed at export)
    dynamic: tuple = ()
    # fp32 parity per output (ONNX Runtime / another fp32 runtime vs the PyTorch module it was
    # traced from): max |got - torch| <= atol + rtol * max|torch|. atol is ~10x the error
    # measured by bench/graph_errors.py (bench/results/graph_errors_256.json; figures beside
    # each graph below; 1024 px within them too, tests/export/test_onnx_export.py).
    atol: dict = field(default_factory=dict)
    rtol: float = 1e-6  # float32 rounding of large values (router scores ~1e3: ulp 6e-5)
    # TensorRT engines (fp16 x10, int8 x100, and fp32 engines, which may use TF32) are held to
    # quantisation's budget, not float32's: engine_atol + 1e-4 * max|ref|, times the scale
    engine_atol: dict = field(default_factory=dict)

    def tolerance(self, output: str, ref, scale: float = 1.0, engine: bool = False) -> float:
        """The parity bound for `output` against reference values `ref` (numpy array): fp32
        (atol + rtol * max|ref|), or an engine's (engine=True: scale * (engine_atol + 1e-4 *
        max|ref|); scale x10 fp16, x100 int8)."""
        import numpy as np

        peak = float(np.max(np.abs(ref))) if np.size(ref) else 0.0
        if engine:
            return scale * (self.engine_atol[output] + ENGINE_RTOL * peak)
        return self.atol[output] + self.rtol * peak

    @property
    def input_names(self) -> list:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict:
        """torch.onnx.export dynamic_axes: {tensor: {axis: symbol}} for the dynamic symbols."""
        axes = {}
        for t in self.inputs + self.outputs:
            ax = {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and d in self.dynamic}
            if ax:
                axes[t.name] = ax
        return axes


F32, I64 = "float32", "int64"
ENGINE_RTOL = 1e-4

GRAPHS: dict[str, GraphSpec] = {
    g.name: g
    for g in (
        GraphSpec(
            "image_encoder",
            inputs=(TensorSpec("image", F32, (1, 3, "S", "S")),),
            outputs=(
                TensorSpec("feat", F32, (1, HIDDEN_DIM, "G", "G")),
                TensorSpec("high_res_0", F32, (1, 32, "G4", "G4")),
                TensorSpec("high_res_1", F32, (1, 64, "G2", "G2")),
            ),
            # measured 3.2e-6 / 5.1e-7 / 1.0e-6 (256 px), feat 4.1e-6 at 1024
            atol={"feat": 3e-5, "high_res_0": 5e-6, "high_res_1": 1e-5},
            engine_atol={"feat": 1e-4, "high_res_0": 1e-4, "high_res_1": 1e-4},
        ),
        GraphSpec(
            "router",
            inputs=(
                TensorSpec("feat", F32, (1, HIDDEN_DIM, "G", "G")),
                TensorSpec("text_emb", F32, ("B", "D")),
                TensorSpec("prev_mask_logits", F32, ("B", 1, "G4", "G4")),
            ),
            outputs=(
                TensorSpec("scores", F32, ("B", "T")),
                TensorSpec("relevance", F32, ("B", "T")),
            ),
            dynamic=("B",),
            # measured 6.1e-5 (peak 1e3: the prior bonus; rtol covers it) / 9.7e-8
            atol={"scores": 1e-5, "relevance": 1e-6},
            engine_atol={"scores": 1e-4, "relevance": 1e-5},
        ),
        GraphSpec(
            "memory_attention",
            inputs=(
                TensorSpec("curr", F32, ("N", HIDDEN_DIM)),
                TensorSpec("curr_pos", F32, ("N", HIDDEN_DIM)),
                TensorSpec("curr_idx", I64, ("N",)),
                TensorSpec("memory", F32, ("M", MEM_DIM)),
                TensorSpec("memory_pos", F32, ("M", MEM_DIM)),
                TensorSpec("memory_idx", I64, ("Ms",)),
            ),
            outputs=(TensorSpec("conditioned", F32, ("N", HIDDEN_DIM)),),
            dynamic=("N", "M", "Ms"),
            # measured 1.4e-6 (both graphs, N/M/Ms over keep 1.0-0.3 and 1-7 frames; 1024 too)
            atol={"conditioned": 2e-5},
            engine_atol={"conditioned": 1e-4},
        ),
        GraphSpec(
            "memory_encoder",
            inputs=(
                TensorSpec("feat", F32, (1, HIDDEN_DIM, "G", "G")),
                TensorSpec("mask_logits", F32, ("B", 1, "G4", "G4")),
                TensorSpec("object_score", F32, ("B", 1)),
                TensorSpec("binarize", F32, (1,)),
            ),
            outputs=(TensorSpec("maskmem", F32, ("B", MEM_DIM, "G", "G")),),
            dynamic=("B",),
            # measured 1.8e-6
            atol={"maskmem": 2e-5},
            engine_atol={"maskmem": 1e-4},
        ),
        GraphSpec(
            "mask_decoder",
            inputs=(
                TensorSpec("feat", F32, ("B", HIDDEN_DIM, "G", "G")),
                TensorSpec("high_res_0", F32, (1, 32, "G4", "G4")),
                TensorSpec("high_res_1", F32, (1, 64, "G2", "G2")),
                TensorSpec("point_coords", F32, ("B", "P", 2)),
                TensorSpec("point_labels", F32, ("B", "P")),
                TensorSpec("mask_input", F32, ("B", 1, "G4", "G4")),
                TensorSpec("has_mask_input", F32, (1,)),
            ),
            outputs=(
                TensorSpec("masks", F32, ("B", NUM_MASK_TOKENS, "G4", "G4")),
                TensorSpec("iou", F32, ("B", NUM_MASK_TOKENS)),
                TensorSpec("obj_ptrs", F32, ("B", NUM_MASK_TOKENS, HIDDEN_DIM)),
                TensorSpec("object_score", F32, ("B", 1)),
            ),
            dynamic=("P", "B"),
            # measured 1.6e-6 / 3.0e-8 / 2.4e-7 / 1.2e-7
            atol={"masks": 2e-5, "iou": 5e-7, "obj_ptrs": 3e-6, "object_score": 2e-6},
            engine_atol={"masks": 1e-3, "iou": 1e-4, "obj_ptrs": 1e-4, "object_score": 1e-4},
        ),
    )
}

GRAPH_ORDER = tuple(GRAPHS)


def geometry(image_size: int, text_dim: int = 512) -> dict:
    """The fixed symbols for a model of this image size."""
    if image_size % 16:
        raise ValueError(f"image size must be a multiple of 16, got {image_size}")
    g = image_size // 16
    return {"S": image_size, "G": g, "G2": 2 * g, "G4": 4 * g, "T": g * g, "D": text_dim}


def keep_to_k(keep: float, num_tokens: int, floor: int = 64) -> int:
    """Tokens kept for a keep ratio: k = max(floor, ceil(keep * T)), never more than T."""
    import math

    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return int(min(num_tokens, max(min(floor, num_tokens), math.ceil(keep * num_tokens - 1e-9))))


def memory_token_range(k_min: int, k_max: int, num_tokens: int, num_maskmem: int = 7,
                       max_obj_ptrs: int = 16, num_cond: int = 1) -> dict:
    """min/max of N, Ms and M over a run whose per-frame keep lies in [k_min, k_max].

    The bank holds `num_cond` conditioning frames with all T tokens, and up to num_maskmem - 1
    past frames with their kept tokens; plus up to max_obj_ptrs pointers of PTR_TOKENS each.
    The smallest memory is the second frame: the conditioning frame and one pointer.
    """
    ms_min = num_cond * num_tokens
    ms_max = num_cond * num_tokens + (num_maskmem - 1) * k_max
    return {
        "N": (k_min, k_max),
        "Ms": (ms_min, ms_max),
        "M": (ms_min + PTR_TOKENS, ms_max + max_obj_ptrs * PTR_TOKENS),
    }


def profile_shapes(image_size: int, keep_min: float, keep_opt: float, keep_max: float,
                   num_maskmem: int = 7, max_obj_ptrs: int = 16, text_dim: int = 512,
                   max_points: int = 8) -> dict:
    """{graph: {input: (min, opt, max)}}: concrete shapes for every input of every graph.

    N, Ms and M span what a run with per-frame keep in [keep_min, keep_max] can produce; opt is
    keep_opt with a full memory bank (the steady state after num_maskmem frames). Fixed inputs
    have min = opt = max. TensorRT optimisation profiles (export) and ONNX Runtime's TensorRT
    provider (runtime) both read these.
    """
    dims = geometry(image_size, text_dim)
    t = dims["T"]
    k_min, k_opt, k_max = (keep_to_k(x, t) for x in (keep_min, keep_opt, keep_max))
    ranges = memory_token_range(k_min, k_max, t, num_maskmem, max_obj_ptrs)
    ms_opt = t + (num_maskmem - 1) * k_opt
    opt = {"N": k_opt, "Ms": ms_opt, "M": ms_opt + max_obj_ptrs * PTR_TOKENS, "P": 1, "B": 1}
    ranges["P"] = (1, max_points)
    ranges["B"] = (1, MAX_BATCH)

    lo = {**dims, **{s: r[0] for s, r in ranges.items()}}
    hi = {**dims, **{s: r[1] for s, r in ranges.items()}}
    mid = {**dims, **opt}
    out = {}
    for gname, spec in GRAPHS.items():
        out[gname] = {}
        for tensor in spec.inputs:
            shapes = tuple(tensor.resolve(d) for d in (lo, mid, hi))
            if not all(isinstance(d, int) for shape in shapes for d in shape):
                raise ValueError(f"{gname}.{tensor.name}: unresolved symbol in {shapes[1]}")
            out[gname][tensor.name] = shapes
    return out


def dynamic_inputs(graph: str) -> list:
    """Inputs of `graph` with a run-time dynamic axis (the ones optimisation profiles cover)."""
    spec = GRAPHS[graph]
    return [t.name for t in spec.inputs if any(d in spec.dynamic for d in t.shape)]
