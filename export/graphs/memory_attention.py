"""Graph `memory_attention`: SAM2's memory attention on any subset of tokens.

Two changes from `sam2.modeling.memory_attention.MemoryAttention`, numerically the same at
keep 1.0:
- RoPE is real-valued (cos/sin tables) and gathered by grid index. SAM2 computes it with complex
  numbers (no ONNX export: "ScalarType ComplexFloat is an unexpected tensor scalar type") and
  by position in the sequence, which only works for full grids. Gathering by index lets the
  router drop queries and lets the memory bank keep only some tokens of a frame.
- Inputs are [tokens, channels] without a batch axis: one object per call (SAM2's video
  predictor also runs each object on its own slice).
Object-pointer tokens (the last M - Ms memory tokens) get no RoPE, as `num_k_exclude_rope`.
"""

import math

import torch
from torch import nn


def rope_tables(dim: int, grid: int, theta: float = 10000.0):
    """cos/sin [grid*grid, dim//2] matching sam2's `compute_axial_cis` for a grid x grid map.

    Pair j of a head vector, (x[2j], x[2j+1]), is rotated by angle[:, j]; the first dim//4
    angles follow x (column), the rest y (row), as in SAM2.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    t = torch.arange(grid * grid, dtype=torch.float32)
    t_x = t % grid
    t_y = torch.div(t, grid, rounding_mode="floor")
    ang = torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, L, C] rotated pairwise by cos/sin [L, C//2] (the real form of x * e^{i angle})."""
    h, n, c = x.shape
    xr = x.reshape(h, n, c // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.reshape(h, n, c)


class FusedAttention(torch.autograd.Function):
    """softmax(q kᵀ / √c) v exported as ONNX Runtime's contrib `MultiHeadAttention`.

    Only for the ONNX Runtime variant of the graph (`memory_attention_ort.onnx`): its CPU kernel
    works in blocks instead of writing the N x M attention matrix (measured at 1024 px, one
    cross-attention of 4096 x 28736 tokens: 0.38 s vs 0.57 s). TensorRT 8.6 cannot parse contrib
    ops, so the TensorRT graph keeps the plain MatMul-Softmax-MatMul form.
    Inputs are [1, L, H*c] with heads laid out as `reshape(L, H, c)`, which is what MHA splits.
    """

    @staticmethod
    def forward(ctx, q, k, v, heads: int):
        b, n, hc = q.shape
        c = hc // heads
        split = lambda x: x.reshape(b, x.shape[1], heads, c).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, n, hc)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())  # the output has q's shape; saves the exporter a warning per call
        return out


def _attention(attn, q, k, v, q_cos, q_sin, k_cos, k_sin, num_k_rope, fused=False):
    """sam2 RoPEAttention.forward for one batch item; q [Nq, C], k/v [Nk, Ckv]."""
    heads = attn.num_heads
    q = attn.q_proj(q)
    k = attn.k_proj(k)
    v = attn.v_proj(v)
    c = q.shape[-1] // heads
    q = q.reshape(-1, heads, c).transpose(0, 1)  # [H, Nq, c]
    k = k.reshape(-1, heads, c).transpose(0, 1)
    v = v.reshape(-1, heads, c).transpose(0, 1)
    q = apply_rope(q, q_cos, q_sin)
    if num_k_rope is None:
        k = apply_rope(k, k_cos, k_sin)
    else:
        k = torch.cat([apply_rope(k[:, :num_k_rope], k_cos, k_sin), k[:, num_k_rope:]], dim=1)
    if fused:
        merge = lambda x: x.transpose(0, 1).reshape(1, -1, heads * c)  # noqa: E731
        out = FusedAttention.apply(merge(q), merge(k), merge(v), heads)
        return attn.out_proj(out.reshape(-1, heads * c))
    # scale q (N x c) rather than the N x M logits: one pass less over the largest tensor
    w = torch.softmax((q * (1.0 / math.sqrt(c))) @ k.transpose(1, 2), dim=-1)
    out = (w @ v).transpose(0, 1).reshape(-1, heads * c)
    return attn.out_proj(out)


class MemoryAttentionGraph(nn.Module):
    def __init__(self, sam2_model, fused: bool = False):
        super().__init__()
        self.fused = fused
        ma = sam2_model.memory_attention
        self.ma = ma
        layer0 = ma.layers[0]
        sa, ca = layer0.self_attn, layer0.cross_attn_image
        grid = int(sam2_model.image_size) // int(sam2_model.backbone_stride)
        cos, sin = rope_tables(sa.internal_dim // sa.num_heads, grid, _theta(sa))
        self.register_buffer("sa_cos", cos, persistent=False)
        self.register_buffer("sa_sin", sin, persistent=False)
        cos, sin = rope_tables(ca.internal_dim // ca.num_heads, grid, _theta(ca))
        self.register_buffer("ca_cos", cos, persistent=False)
        self.register_buffer("ca_sin", sin, persistent=False)

    def forward(self, curr, curr_pos, curr_idx, memory, memory_pos, memory_idx):
        ma = self.ma
        out = curr + 0.1 * curr_pos if ma.pos_enc_at_input else curr
        sa_cos, sa_sin = self.sa_cos[curr_idx], self.sa_sin[curr_idx]
        q_cos, q_sin = self.ca_cos[curr_idx], self.ca_sin[curr_idx]
        k_cos, k_sin = self.ca_cos[memory_idx], self.ca_sin[memory_idx]
        num_k_rope = memory_idx.shape[0]
        for layer in ma.layers:
            t2 = layer.norm1(out)
            qk = t2 + curr_pos if layer.pos_enc_at_attn else t2
            out = out + _attention(layer.self_attn, qk, qk, t2, sa_cos, sa_sin, sa_cos, sa_sin, None,
                                   self.fused)
            t2 = layer.norm2(out)
            q = t2 + curr_pos if layer.pos_enc_at_cross_attn_queries else t2
            k = memory + memory_pos if layer.pos_enc_at_cross_attn_keys else memory
            out = out + _attention(layer.cross_attn_image, q, k, memory, q_cos, q_sin, k_cos, k_sin,
                                   num_k_rope, self.fused)
            t2 = layer.norm3(out)
            out = out + layer.linear2(layer.activation(layer.linear1(t2)))
        return ma.norm(out)


def _theta(attn) -> float:
    # RoPEAttention keeps theta only inside its partial(compute_axial_cis, theta=...)
    return float(attn.compute_cis.keywords.get("theta", 10000.0))
