"""Chapter attention in Triton (SPEC 2.2): paged attention with chapters as pages, forward and backward.

    chapter_attention_fwd(q, k, v, index, weight, scale) -> out, lse
    chapter_attention_bwd(dout, dlse, q, k, v, index, weight, out, lse, scale) -> dq, dk, dv, dweight

q (U, c, h, e); k, v (u, t, kv, e) tables of unique chapters; index (U, n) int64 rows of the tables, -1 = unused slot;
weight (U, n) float32. Per (unit, query, head) over the keys j of the used slots, w_j the weight of j's slot:
s_j = scale w_j q.k_j, lse = logsumexp s_j, out = sum_j softmax(s)_j w_j v_j. Query head i reads kv head i // (h // kv).

A program owns one (unit, kv head, block of rows), a row being a (query, head of the kv group) pair, so the group's
heads share each K/V tile load. It loops over the unit's slots, loads that chapter's tile by index (t tokens padded to
a power of two >= 16) and keeps an online softmax in fp32. The backward is deterministic without atomics: kernel A over
the same programs gives dq and per-program partial d(weight) that torch sums in a fixed order; kernel B over
(table row, kv head) walks the (unit, slot) pairs that read the row (a CSR list built in torch) and writes dk, dv once.
Set TRITON_INTERPRET=1 before triton is first imported (and keep it set) to run the kernels on CPU tensors.
"""

import contextlib
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch and C++ backends serve chapter attention
    triton = None
    tl = None

AVAILABLE = triton is not None

_LOG2E = math.log2(math.e)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _next_pow2(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, x - 1).bit_length())


def _tile_rows(kernel: str, rows: int, t_pad: int, e_pad: int, fp32: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps) per kernel, checked against sm_90 builds (t, e <= 64, 128) to stay in registers.

    fwd holds q and the fp32 accumulator, (BLOCK_M, e); dq also dout and dq; dkv keeps the chapter's k, v, dk, dv,
    (t, e), and streams BLOCK_M query rows past them. fp32 inputs take exact (non-TF32) dots, which run on the FMA
    units and need small tiles. tl.dot needs >= 16 rows."""
    if fp32:
        block_m, num_warps = 32, 8
    elif kernel == "fwd":
        block_m, num_warps = (128, 8) if e_pad <= 128 and t_pad <= 128 else (64, 8)
    elif kernel == "dq":
        block_m, num_warps = (64, 4) if t_pad * e_pad <= 64 * 128 else (32, 8)
    else:
        block_m, num_warps = (64, 4) if t_pad * e_pad < 64 * 128 else (32, 8)
    block_m = min(block_m, _next_pow2(rows))
    return block_m, (num_warps if max(t_pad, e_pad) >= 64 else 4)


if AVAILABLE:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the interpreter multiplies bfloat16 tiles as their raw uint16 bits; fp32 of bf16 values is exact
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _chapter_tile(T, row, kvh, t, KV: tl.constexpr, E: tl.constexpr, T_PAD: tl.constexpr, E_PAD: tl.constexpr):
        # T[row, :t, kvh, :E] zero-padded to (T_PAD, E_PAD)
        r = tl.arange(0, T_PAD)
        d = tl.arange(0, E_PAD)
        ptr = T + row * t * KV * E + kvh * E + (r * KV * E)[:, None] + d[None, :]
        return tl.load(ptr, mask=(r < t)[:, None] & (d < E)[None, :], other=0.0)

    @triton.jit
    def _row_offsets(unit, kvh, rows, c, H: tl.constexpr, G: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr):
        # rows are (query i, group head g) pairs, row = i * G + g, head = kvh * G + g; -> offsets into (U, c, h, e)
        d = tl.arange(0, E_PAD)
        off = unit * c * H * E + ((rows // G) * H + kvh * G + rows % G)[:, None] * E + d[None, :]
        return off, (rows < c * G)[:, None] & (d < E)[None, :]

    @triton.jit
    def _fwd_kernel(Q, K, V, INDEX, WEIGHT, OUT, LSE, qk_scale2, c, n, t,
                    H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                    BLOCK_M: tl.constexpr, T_PAD: tl.constexpr, E_PAD: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
        block = tl.program_id(0)
        unit = tl.program_id(1).to(tl.int64) // KV
        kvh = tl.program_id(1) % KV
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        off, mask = _row_offsets(unit, kvh, rows, c, H, G, E, E_PAD)
        q = tl.load(Q + off, mask=mask, other=0.0)
        r_ok = tl.arange(0, T_PAD) < t

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, E_PAD], tl.float32)
        for s in range(0, n):
            row = tl.load(INDEX + unit * n + s)
            if row >= 0:
                w = tl.load(WEIGHT + unit * n + s)
                k = _chapter_tile(K, row, kvh, t, KV, E, T_PAD, E_PAD)
                v = _chapter_tile(V, row, kvh, t, KV, E, T_PAD, E_PAD)
                s2 = _dot(q, tl.trans(k), PRECISION, UPCAST) * (qk_scale2 * w)
                s2 = tl.where(r_ok[None, :], s2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s2, 1))  # finite: the slot has t >= 1 real tokens
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s2 - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                pv = _dot(p.to(v.dtype), v, PRECISION, UPCAST)
                acc = acc * alpha[:, None] + pv * w
                m_i = m_new

        seen = l_i > 0.0  # false only for a unit without a used slot: out 0, lse -inf
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        off, mask = _row_offsets(unit, kvh, rows, c, H, G, E, E_PAD)  # recomputed: not live across the loop
        tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=mask)
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        lse_off = unit * c * H + (rows // G) * H + kvh * G + rows % G
        tl.store(LSE + lse_off, lse, mask=rows < c * G)

    @triton.jit
    def _row_stats(LSE, DELTA, DLSE, unit, kvh, rows, c, H: tl.constexpr, G: tl.constexpr):
        # per-row lse (log2 domain; +inf on padded rows so their p is 0), D = dO . o and dlse
        off = unit * c * H + (rows // G) * H + kvh * G + rows % G
        ok = rows < c * G
        lse2 = tl.load(LSE + off, mask=ok, other=float("inf")) * 1.4426950408889634
        return lse2, tl.load(DELTA + off, mask=ok, other=0.0), tl.load(DLSE + off, mask=ok, other=0.0)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, INDEX, WEIGHT, DOUT, DLSE, LSE, DELTA, DQ, DW_PART, scale, c, n, t, n_blocks,
                       H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                       BLOCK_M: tl.constexpr, T_PAD: tl.constexpr, E_PAD: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr):
        # dq and this program's share of d(weight) for each slot; same programs as the forward
        block = tl.program_id(0)
        unit = tl.program_id(1).to(tl.int64) // KV
        kvh = tl.program_id(1) % KV
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        off, mask = _row_offsets(unit, kvh, rows, c, H, G, E, E_PAD)
        q = tl.load(Q + off, mask=mask, other=0.0)
        do = tl.load(DOUT + off, mask=mask, other=0.0)
        lse2, delta, dlse = _row_stats(LSE, DELTA, DLSE, unit, kvh, rows, c, H, G)
        r_ok = tl.arange(0, T_PAD) < t
        dw_base = ((unit * KV + kvh) * n_blocks + block) * n

        dq = tl.zeros([BLOCK_M, E_PAD], tl.float32)
        for s in range(0, n):
            row = tl.load(INDEX + unit * n + s)
            if row >= 0:
                w = tl.load(WEIGHT + unit * n + s)
                k = _chapter_tile(K, row, kvh, t, KV, E, T_PAD, E_PAD)
                v = _chapter_tile(V, row, kvh, t, KV, E, T_PAD, E_PAD)
                qk = _dot(q, tl.trans(k), PRECISION, UPCAST)
                p = tl.math.exp2(qk * (scale * w * 1.4426950408889634) - lse2[:, None])
                p = tl.where(r_ok[None, :], p, 0.0)
                dpv = _dot(do, tl.trans(v), PRECISION, UPCAST)
                ds = p * (w * dpv - delta[:, None] + dlse[:, None])
                dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST) * (scale * w)
                tl.store(DW_PART + dw_base + s, tl.sum(tl.sum(scale * ds * qk + p * dpv, 1), 0))
        off, mask = _row_offsets(unit, kvh, rows, c, H, G, E, E_PAD)
        tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_dkv_kernel(Q, K, V, WEIGHT, DOUT, DLSE, LSE, DELTA, OFFSETS, ORDER, DK, DV, scale, c, n, t,
                        H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                        BLOCK_M: tl.constexpr, T_PAD: tl.constexpr, E_PAD: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
        # one (table row, kv head): its readers are ORDER[OFFSETS[row]:OFFSETS[row + 1]] (flat unit * n + slot),
        # summed in that fixed order in registers; tiles are transposed, (tokens, query rows)
        row = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        k = _chapter_tile(K, row, kvh, t, KV, E, T_PAD, E_PAD)
        v = _chapter_tile(V, row, kvh, t, KV, E, T_PAD, E_PAD)
        dk = tl.zeros([T_PAD, E_PAD], tl.float32)
        dv = tl.zeros([T_PAD, E_PAD], tl.float32)
        for j in range(tl.load(OFFSETS + row), tl.load(OFFSETS + row + 1)):
            flat = tl.load(ORDER + j)
            unit = flat // n
            w = tl.load(WEIGHT + flat)
            for m0 in range(0, c * G, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                off, mask = _row_offsets(unit, kvh, rows, c, H, G, E, E_PAD)
                q = tl.load(Q + off, mask=mask, other=0.0)
                do = tl.load(DOUT + off, mask=mask, other=0.0)
                lse2, delta, dlse = _row_stats(LSE, DELTA, DLSE, unit, kvh, rows, c, H, G)
                qk = _dot(k, tl.trans(q), PRECISION, UPCAST)
                p = tl.math.exp2(qk * (scale * w * 1.4426950408889634) - lse2[None, :])
                dpv = _dot(v, tl.trans(do), PRECISION, UPCAST)
                ds = p * (w * dpv - delta[None, :] + dlse[None, :])
                dv += _dot(p.to(do.dtype), do, PRECISION, UPCAST) * w
                dk += _dot(ds.to(q.dtype), q, PRECISION, UPCAST) * (scale * w)
        r = tl.arange(0, T_PAD)
        d = tl.arange(0, E_PAD)
        off = row * t * KV * E + kvh * E + (r * KV * E)[:, None] + d[None, :]
        mask = (r < t)[:, None] & (d < E)[None, :]  # padded tokens got gradients from zero keys: never stored
        tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=mask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, weight: torch.Tensor):
    if not AVAILABLE:
        raise RuntimeError("triton is not installed; chapter attention's Triton kernels are unavailable")
    if q.dtype not in _DTYPES:
        raise TypeError(f"chapter attention (triton) supports float32, bfloat16 and float16, not {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (U, c, h, e) and k, v (u, t, kv, e); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    U, _, h, e = q.shape
    kv = k.shape[2]
    if k.shape[3] != e or h % kv != 0:
        raise ValueError(f"head dims differ ({e} vs {k.shape[3]}) or h={h} is not a multiple of kv={kv}")
    if index.dtype != torch.int64 or index.dim() != 2 or index.shape[0] != U or weight.shape != index.shape:
        raise ValueError(f"expected index (U, n) int64 and weight (U, n); got {index.dtype} {tuple(index.shape)}, "
                         f"{tuple(weight.shape)} for U={U}")
    if len({x.device for x in (q, k, v, index, weight)}) != 1:
        raise ValueError("q, k, v, index and weight must be on one device")
    interpreted = _interpreted()
    if interpreted and isinstance(tl.sum, triton.runtime.JITFunction):
        raise RuntimeError("this module's kernels are interpreted but triton was imported without TRITON_INTERPRET=1; "
                           "set it before triton is first imported (triton decorates its own library at import)")
    if q.device.type != "cuda" and not interpreted:
        raise RuntimeError(f"Triton chapter attention got {q.device.type} tensors: set TRITON_INTERPRET=1 before "
                           "triton is first imported to run it on CPU")


def _interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter: TRITON_INTERPRET=1 was set when they were decorated."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def _meta(q: torch.Tensor, k: torch.Tensor, kernel: str) -> dict:
    _, c, h, e = q.shape
    t, kv = k.shape[1:3]
    t_pad, e_pad = _next_pow2(t), _next_pow2(e)
    fp32 = q.dtype == torch.float32
    block_m, num_warps = _tile_rows(kernel, c * (h // kv), t_pad, e_pad, fp32)
    upcast = _interpreted()
    exact = upcast or fp32  # fp32 inputs: no TF32 rounding (SPEC 1.3 asks 1e-5 relative)
    return dict(H=h, KV=kv, G=h // kv, E=e, BLOCK_M=block_m, T_PAD=t_pad, E_PAD=e_pad,
                PRECISION="ieee" if exact else "tf32", UPCAST=upcast, num_warps=num_warps, num_stages=2)


def _on_device(device: torch.device):
    """Launch on the tensors' GPU rather than the current one; nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def chapter_attention_fwd(q, k, v, index, weight, scale: float):
    """q (U, c, h, e), k/v (u, t, kv, e), index/weight (U, n) -> out (U, c, h, e) in q's dtype, lse (U, c, h) fp32."""
    _check(q, k, v, index, weight)
    q, k, v, index = q.contiguous(), k.contiguous(), v.contiguous(), index.contiguous()
    weight = weight.to(torch.float32).contiguous()
    U, c, h, _ = q.shape
    n, t = index.shape[1], k.shape[1]
    meta = _meta(q, k, "fwd")
    out = torch.empty_like(q)
    lse = torch.empty((U, c, h), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    grid = (triton.cdiv(c * meta["G"], meta["BLOCK_M"]), U * meta["KV"])
    with _on_device(q.device):
        _fwd_kernel[grid](q, k, v, index, weight, out, lse, float(scale) * _LOG2E, c, n, t, **meta)
    return out, lse


def _readers(index: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the (unit, slot) pairs reading each table row: order (flat unit * n + slot), offsets (num_rows + 1,).

    Unused slots (-1) sort after every row and so fall outside all ranges; no host sync."""
    flat = index.flatten()
    key = torch.where(flat < 0, torch.full_like(flat, num_rows), flat)
    key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(key, torch.arange(num_rows + 1, device=index.device, dtype=key.dtype))
    return order.contiguous(), offsets.contiguous()


def chapter_attention_bwd(dout, dlse, q, k, v, index, weight, out, lse, scale: float):
    """-> dq (U, c, h, e), dk/dv (u, t, kv, e) in q's dtype, dweight (U, n) fp32 (0 for unused slots); deterministic."""
    _check(q, k, v, index, weight)
    q, k, v, index = q.contiguous(), k.contiguous(), v.contiguous(), index.contiguous()
    dout = dout.to(q.dtype).contiguous()
    weight = weight.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(torch.float32).contiguous()
    U, c, h, _ = q.shape
    u, t = k.shape[:2]
    n = index.shape[1]
    meta_dq, meta_dkv = _meta(q, k, "dq"), _meta(q, k, "dkv")
    kv = meta_dq["KV"]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    n_blocks = triton.cdiv(c * meta_dq["G"], meta_dq["BLOCK_M"])
    dw_part = torch.zeros((U, kv, n_blocks, n), dtype=torch.float32, device=q.device)
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # D = dO . o per (unit, query, head)
    order, offsets = _readers(index, u)
    with _on_device(q.device):
        if dq.numel() > 0 and n > 0:
            _bwd_dq_kernel[(n_blocks, U * kv)](q, k, v, index, weight, dout, dlse, lse, delta, dq, dw_part,
                                               float(scale), c, n, t, n_blocks, **meta_dq)
        else:
            dq.zero_()
        if dk.numel() > 0:
            _bwd_dkv_kernel[(u, kv)](q, k, v, weight, dout, dlse, lse, delta, offsets, order, dk, dv,
                                     float(scale), c, n, t, **meta_dkv)
    dweight = dw_part.sum(dim=(1, 2))  # fixed-order reduction over (kv head, row block)
    return dq, dk, dv, dweight
