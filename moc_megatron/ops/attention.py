"""Chapter attention (SPEC 2.2): attention of each routing unit's queries over the chapters it selected.

Like paged attention with chapters as pages: K/V live in tables of the unique chapters and each unit
reads its chapters by index, with an online softmax over them. The gathered K/V and the full score
matrix of a unit are never built. The chapter's weight scales its keys and its values (SPEC 1.3):

    s_j = w_j (q . k_j) / sqrt(e);  lse = logsumexp_j s_j;  out = sum_j exp(s_j - lse) w_j v_j

    chapter_attention(q, k, v, index, weight, valid=None) -> out, lse

Backends, chosen per call by device and MOC_OPS_BACKEND like the gather/scatter ops: the compiled
C++ kernel (CPU), the Triton kernel (GPU), or ``reference_forward``/``reference_backward`` below, the
definition, bounded in memory by blocks of chapters. Letters: U units, c queries per unit, h query
heads, kv K/V heads (GQA: head i reads kv head i // (h // kv)), e head dim, u table rows, t tokens per
chapter, n slots per unit.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor

from moc_megatron.ops._backend import attention_kernels
from moc_megatron.ops.chapter_ops import chapter_scatter

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SCORE_BLOCK_ELEMS = 1 << 23  # the reference's score block: 32 MiB of fp32


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chapter_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight: Tensor,
                      valid: Tensor | None = None, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention of each unit's queries over its selected chapters; differentiable in q, k, v, weight.

    q (U, c, h, e); k, v (u, t, kv, e) tables of chapters; index (U, n) int64 rows of those tables,
    -1 for an unused slot; weight (U, n) chapter weights; valid (U, n) bool, optional (False = unused).
    Returns out (U, c, h, e) in q's dtype and lse (U, c, h) in fp32 (fp64 for fp64 inputs). A unit with
    no used slot gets out 0 and lse -inf. The log-sum-exp takes a gradient too (the EP merge needs it).
    """
    _check(q, k, v, index, weight, valid)
    if valid is not None:
        index = index.masked_fill(~valid, -1)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention(q.contiguous(), k.contiguous(), v.contiguous(), index.contiguous(),
                      weight.to(_acc(q.dtype)).contiguous(), scale)


def _check(q, k, v, index, weight, valid) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"chapter_attention: q must be (U, c, h, e) and k, v equal (u, t, kv, e), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"chapter_attention: q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"chapter_attention: head dims differ or {q.shape[2]} query heads are not a multiple "
                         f"of {k.shape[2]} kv heads")
    if index.dtype != torch.int64 or index.dim() != 2 or index.shape[0] != q.shape[0]:
        raise TypeError(f"chapter_attention: index must be (U={q.shape[0]}, n) int64, got "
                        f"{tuple(index.shape)} {index.dtype}")
    if weight.shape != index.shape or (valid is not None and valid.shape != index.shape):
        raise ValueError(f"chapter_attention: weight {tuple(weight.shape)} and valid must match index "
                         f"{tuple(index.shape)}")
    devices = {t.device for t in (q, k, v, index, weight) + ((valid,) if valid is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"chapter_attention: tensors are on several devices: {sorted(map(str, devices))}")


@torch.library.custom_op("moc_ops::chapter_attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return attention_kernels(q.device).chapter_attention_fwd(q, k, v, index, weight, scale)


@_attention.register_fake
def _(q, k, v, index, weight, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc(q.dtype))


@torch.library.custom_op("moc_ops::chapter_attention_backward", mutates_args=())
def _attention_backward(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor,
                        weight: Tensor, out: Tensor, lse: Tensor, scale: float
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return attention_kernels(q.device).chapter_attention_bwd(dout, dlse, q, k, v, index, weight, out, lse, scale)


@_attention_backward.register_fake
def _(dout, dlse, q, k, v, index, weight, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, index, weight, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, index, weight, out, lse)


def _backward(ctx, dout, dlse):
    q, k, v, index, weight, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dlse = torch.zeros_like(lse) if dlse is None else dlse.contiguous()
    dq, dk, dv, dweight = _attention_backward(dout, dlse, q, k, v, index, weight, out, lse, ctx.scale)
    return dq, dk, dv, None, dweight, None


_attention.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The reference: plain torch, blocks of chapters so the scores stay bounded in memory.


def _slot_blocks(q: Tensor, t: int, n: int):
    """Slices of the slots, each block's scores (U, c, h, block * t) under _SCORE_BLOCK_ELEMS."""
    per_slot = max(q.shape[0] * q.shape[1] * q.shape[2] * t, 1)
    step = max(1, min(n, _SCORE_BLOCK_ELEMS // per_slot))
    return [slice(j, min(j + step, n)) for j in range(0, n, step)]


def _block(q, k, v, index, weight, scale, sl):
    """One block of slots: raw scores q.k*scale (U, c, kv, g, b, t), weighted K/V rows and the mask."""
    U, c, h, e = q.shape
    kv = k.shape[2]
    idx = index[:, sl]                                   # (U, b)
    used = idx >= 0
    rows = idx.clamp(min=0)
    w = weight[:, sl] * used                             # (U, b)
    kb, vb = k[rows].to(q.dtype), v[rows].to(q.dtype)    # (U, b, t, kv, e)
    qk = torch.einsum("uckge,ubtke->uckgbt", q.view(U, c, kv, h // kv, e), kb) * scale
    return qk, kb, vb, w, used, rows


def reference_forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight: Tensor,
                      scale: float) -> tuple[Tensor, Tensor]:
    """The definition, with the backends' interface: out (U, c, h, e) in q's dtype, lse (U, c, h) fp32."""
    U, c, h, e = q.shape
    t, kv = k.shape[1], k.shape[2]
    acc = _acc(q.dtype)
    qf = q.to(acc)
    peak = qf.new_full((U, c, kv, h // kv), -math.inf)
    total = qf.new_zeros((U, c, kv, h // kv))
    o = qf.new_zeros((U, c, kv, h // kv, e))
    for sl in _slot_blocks(q, t, index.shape[1]):
        qk, kb, vb, w, used, _ = _block(qf, k, v, index, weight, scale, sl)
        s = (qk * w[:, None, None, None, :, None]).masked_fill(~used[:, None, None, None, :, None], -math.inf)
        new_peak = torch.maximum(peak, s.amax((-2, -1)))
        safe = torch.where(torch.isinf(new_peak), 0.0, new_peak)              # no unit key yet: keep zeros
        p = (s - safe[..., None, None]).exp()                                 # (U, c, kv, g, b, t)
        rescale = (peak - safe).exp()
        total = total * rescale + p.sum((-2, -1))
        o = o * rescale[..., None] + torch.einsum("uckgbt,ubtke->uckge", p * w[:, None, None, None, :, None], vb)
        peak = new_peak
    out = torch.where(total[..., None] > 0, o / total.clamp(min=1e-30)[..., None], 0.0)
    lse = torch.where(total > 0, peak + total.clamp(min=1e-30).log(), -math.inf)
    return out.reshape(U, c, h, e).to(q.dtype), lse.reshape(U, c, h)


def reference_backward(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor,
                       weight: Tensor, out: Tensor, lse: Tensor, scale: float):
    """Gradients of reference_forward given dout and dlse: dq, dk, dv (tables) and dweight (SPEC 2.2).

    The tables' gradients are summed per row by chapter_scatter: a fixed order, no atomics."""
    U, c, h, e = q.shape
    u, t, kv, _ = k.shape
    g, acc = h // kv, _acc(q.dtype)
    qf, do = q.to(acc).view(U, c, kv, g, e), dout.to(acc).view(U, c, kv, g, e)
    D = (do * out.to(acc).view(U, c, kv, g, e)).sum(-1) - dlse.to(acc).view(U, c, kv, g)  # (U, c, kv, g)
    lse_safe = torch.where(torch.isinf(lse), 0.0, lse).to(acc).view(U, c, kv, g)
    dq = torch.zeros_like(qf)
    dk = qf.new_zeros((u, t, kv * e))
    dv = qf.new_zeros((u, t, kv * e))
    dweight = qf.new_zeros(index.shape)
    for sl in _slot_blocks(q, t, index.shape[1]):
        qk, kb, vb, w, used, rows = _block(qf.view(U, c, h, e), k, v, index, weight, scale, sl)
        wb = w[:, None, None, None, :, None]
        s = (qk * wb).masked_fill(~used[:, None, None, None, :, None], -math.inf)
        p = (s - lse_safe[..., None, None]).exp()                              # (U, c, kv, g, b, t)
        dpv = torch.einsum("uckge,ubtke->uckgbt", do, vb)                      # dout . v_j
        ds = p * (wb * dpv - D[..., None, None])
        dq += torch.einsum("uckgbt,ubtke->uckge", ds * wb, kb) * scale
        dk_slot = torch.einsum("uckgbt,uckge->ubtke", ds * wb, qf) * scale     # (U, b, t, kv, e)
        dv_slot = torch.einsum("uckgbt,uckge->ubtke", p * wb, do)
        dweight[:, sl] = (ds * qk + p * dpv).sum((1, 2, 3, 5)) * used
        keep = used.to(acc)
        dk += chapter_scatter(dk_slot.reshape(U, -1, t, kv * e), rows, keep, u)
        dv += chapter_scatter(dv_slot.reshape(U, -1, t, kv * e), rows, keep, u)
    return (dq.reshape(U, c, h, e).to(q.dtype), dk.view(u, t, kv, e).to(k.dtype),
            dv.view(u, t, kv, e).to(v.dtype), dweight.to(weight.dtype))


REFERENCE = SimpleNamespace(chapter_attention_fwd=reference_forward, chapter_attention_bwd=reference_backward)
