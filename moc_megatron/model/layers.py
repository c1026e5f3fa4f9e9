"""Backbone layers (SPEC 1): RMSNorm, rotary embeddings, GQA self-attention, SwiGLU.

Projections are megatron-core tensor-parallel linears: column-parallel splits heads (or the MLP's
inner width) across TP ranks, row-parallel sums the partial outputs. At TP size 1 they are plain
linears. Letters: b batch, s sequence, d hidden, h heads, g key/value heads, e head dim.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import nn

from moc_megatron.parallel.state import ParallelContext


def normal_init(std: float):
    return partial(nn.init.normal_, mean=0.0, std=std)


def column_linear(ctx: ParallelContext, d_in: int, d_out: int, init) -> nn.Module:
    """d_in -> d_out split over TP ranks along d_out; input gradient all-reduced over TP."""
    return tensor_parallel.ColumnParallelLinear(
        d_in, d_out, config=ctx.megatron_config(), init_method=init, bias=False,
        gather_output=False, tp_group=ctx.tp_group)


def row_linear(ctx: ParallelContext, d_in: int, d_out: int, init) -> nn.Module:
    """d_in (split over TP ranks) -> d_out, partial outputs all-reduced over TP."""
    return tensor_parallel.RowParallelLinear(
        d_in, d_out, config=ctx.megatron_config(), init_method=init, bias=False,
        input_is_parallel=True, skip_bias_add=False, tp_group=ctx.tp_group)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """megatron-core linears return (output, bias); we never use the bias."""
    return layer(x)[0]


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x) (* weight), computed in fp32."""
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms_norm(x, self.eps, self.weight)


def rotary_cos_sin(s: int, e: int, base: float, device=None, offset: int = 0):
    """cos, sin of shape (s, e) for positions offset..offset+s-1 (Llama's layout: halves rotated)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, e, 2, dtype=torch.float32, device=device) / e))
    pos = torch.arange(offset, offset + s, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)  # (s, e/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (b, s, h, e); cos/sin: (s, e)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated * sin).to(x.dtype)


class SelfAttention(nn.Module):
    """Causal grouped-query attention with RoPE; heads split over TP ranks."""

    def __init__(self, ctx: ParallelContext, d: int, heads: int, kv_heads: int, rotary_base: float, std: float):
        super().__init__()
        self.e = d // heads
        self.h_local, self.g_local = heads // ctx.tp_size, kv_heads // ctx.tp_size
        self.rotary_base = rotary_base
        self.q_proj = column_linear(ctx, d, heads * self.e, normal_init(std))
        self.k_proj = column_linear(ctx, d, kv_heads * self.e, normal_init(std))
        self.v_proj = column_linear(ctx, d, kv_heads * self.e, normal_init(std))
        self.o_proj = row_linear(ctx, heads * self.e, d, normal_init(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, s, d)
        b, s, _ = x.shape
        q = linear(self.q_proj, x).view(b, s, self.h_local, self.e)
        k = linear(self.k_proj, x).view(b, s, self.g_local, self.e)
        v = linear(self.v_proj, x).view(b, s, self.g_local, self.e)
        cos, sin = rotary_cos_sin(s, self.e, self.rotary_base, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)  # (b, h, s, e)
        return linear(self.o_proj, out.transpose(1, 2).reshape(b, s, self.h_local * self.e))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the inner width is split over TP ranks."""

    def __init__(self, ctx: ParallelContext, d: int, d_ff: int, std: float):
        super().__init__()
        self.gate_proj = column_linear(ctx, d, d_ff, normal_init(std))
        self.up_proj = column_linear(ctx, d, d_ff, normal_init(std))
        self.down_proj = row_linear(ctx, d_ff, d, normal_init(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))
