"""chapter_attention against the naive per-unit formulation, on every backend this machine has.

The naive reference gathers each unit's chapters into an explicit K/V copy, scales them by their
weights and runs plain softmax attention in float64 (SPEC 1.3); autograd of it gives the gradients.
Letters: U units, c queries, h heads, kv K/V heads, e head dim, u table rows, t tokens, n slots.
"""

import math

import pytest
import torch

from moc_megatron.ops import _backend, chapter_attention
from moc_megatron.ops.attention import reference_backward, reference_forward

HAS_CPP = _backend.EXTENSION is not None and hasattr(_backend.EXTENSION, "chapter_attention_fwd")
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="_C has no chapter attention"))]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, request.param)
    return request.param


def naive(q, k, v, index, weight):
    """Per unit: explicit gather of its used chapters, weighted, then softmax attention (float64)."""
    U, c, h, e = q.shape
    rep = h // k.shape[2]
    outs, lses = [], []
    for b in range(U):
        slots = [j for j in range(index.shape[1]) if index[b, j] >= 0]
        if not slots:
            outs.append(q.new_zeros(c, h, e))
            lses.append(q.new_full((c, h), -math.inf))
            continue
        K = torch.cat([k[index[b, j]] * weight[b, j] for j in slots]).repeat_interleave(rep, dim=1)  # (m, h, e)
        V = torch.cat([v[index[b, j]] * weight[b, j] for j in slots]).repeat_interleave(rep, dim=1)
        s = torch.einsum("che,mhe->hcm", q[b], K) / math.sqrt(e)
        lse = s.logsumexp(-1)
        outs.append(torch.einsum("hcm,mhe->che", (s - lse[..., None]).exp(), V))
        lses.append(lse.T)
    return torch.stack(outs), torch.stack(lses)


def case(U=4, c=5, h=4, kv=2, e=8, u=7, t=5, n=4, dtype=torch.float32, seed=0, unused=True):
    """Random inputs with GQA, duplicate rows within and across units, unused slots and a unit that
    reads nothing at all (shared only, in the model's terms)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(U, c, h, e, generator=g)
    k, v = torch.randn(2, u, t, kv, e, generator=g)
    index = torch.randint(0, u, (U, n), generator=g)
    index[0, 1] = index[0, 0]
    index[1, 0] = index[0, 0]
    if unused:
        index[1, -1] = -1
        index[-1] = -1
    weight = torch.rand(U, n, generator=g) + 0.1
    return [x.to(dtype) for x in (q, k, v)] + [index, weight]


def grads(fn, inputs, gout, glse):
    leaves = [x.detach().requires_grad_() for x in inputs[:3]] + [inputs[3], inputs[4].detach().requires_grad_()]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)
    loss = (out * gout).sum() + torch.where(finite, lse * glse, 0.0).sum()
    got = torch.autograd.grad(loss, [leaves[i] for i in (0, 1, 2, 4)])
    return out.detach(), lse.detach(), got


@pytest.mark.parametrize("shape", [dict(), dict(h=4, kv=4), dict(c=1, t=3), dict(t=16, e=16, n=6, u=9)])
def test_matches_naive_per_unit_formulation_fp32(backend, shape):
    inputs = case(**shape)
    gen = torch.Generator().manual_seed(5)
    out, lse = chapter_attention(*inputs)
    gout, glse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    out, lse, got = grads(chapter_attention, inputs, gout, glse)
    wide = [x.double() if x.is_floating_point() else x for x in inputs]
    ref_out, ref_lse, ref = grads(naive, wide, gout.double(), glse.double())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("dq", "dk", "dv", "dweight"), got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bf16_within_bf16_rounding_of_fp32(backend):
    inputs = case(u=9, t=16, e=16, n=6)
    low = [x.bfloat16() if x.is_floating_point() and i < 3 else x for i, x in enumerate(inputs)]
    out, lse = chapter_attention(*low)
    ref_out, ref_lse = naive(*[x.double() if x.is_floating_point() else x for x in low])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32  # fp32 statistics, whatever the input
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)  # accumulated in fp32
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    _, _, got = grads(chapter_attention, low, gout.bfloat16(), torch.zeros(lse.shape))
    _, _, ref = grads(naive, [x.double() if x.is_floating_point() else x for x in low], gout.double(),
                      torch.zeros(lse.shape, dtype=torch.float64))
    for a, b in zip(got, ref):
        assert (a.double() - b).abs().max() <= 2e-2 * b.abs().max().clamp(min=1.0)


def test_gradcheck_float64_through_out_and_lse(backend):
    q, k, v, index, weight = case(U=3, c=2, h=2, kv=1, e=3, u=4, t=2, n=3, dtype=torch.float64)
    index[-1] = -1
    index[-1, 0] = 2  # keep every lse finite for finite differences
    ins = [x.requires_grad_() for x in (q, k, v)] + [weight.double().requires_grad_()]
    assert torch.autograd.gradcheck(lambda q, k, v, w: chapter_attention(q, k, v, index, w), ins)


def test_unit_with_no_used_slot_gives_zero_output_and_gradients(backend):
    q, k, v, index, weight = case()
    out, lse, got = grads(chapter_attention, [q, k, v, index, weight], torch.ones(q.shape), torch.ones(q.shape[:3]))
    assert (out[-1] == 0).all() and torch.isinf(lse[-1]).all() and (lse[-1] < 0).all()
    assert all(torch.isfinite(g).all() for g in got)
    assert (got[0][-1] == 0).all() and (got[3][-1] == 0).all() and got[3][1, -1] == 0


def test_valid_mask_equals_minus_one_index(backend):
    q, k, v, index, weight = case(unused=False)
    valid = torch.ones(index.shape, dtype=torch.bool)
    valid[2, 1:] = False
    a = chapter_attention(q, k, v, index, weight, valid=valid)
    b = chapter_attention(q, k, v, index.masked_fill(~valid, -1), weight)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_two_runs_are_bitwise_equal(backend):
    inputs = case(u=9, t=16, e=16, n=6)
    gout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2))
    first, second = (grads(chapter_attention, inputs, gout, torch.zeros(inputs[0].shape[:3])) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


def test_reference_blocks_do_not_change_the_result(monkeypatch):
    """The reference splits the slots into blocks to bound memory; one slot per block gives the same numbers."""
    import moc_megatron.ops.attention as attention

    inputs = case(u=9, t=16, e=16, n=6, dtype=torch.float64)
    scale = inputs[0].shape[-1] ** -0.5
    w = inputs[4].double()
    out, lse = reference_forward(*inputs[:4], w, scale)
    dout = torch.randn(out.shape, dtype=torch.float64)
    g = reference_backward(dout, torch.zeros_like(lse), *inputs[:4], w, out, lse, scale)
    monkeypatch.setattr(attention, "_SCORE_BLOCK_ELEMS", 1)
    out1, lse1 = reference_forward(*inputs[:4], w, scale)
    g1 = reference_backward(dout, torch.zeros_like(lse), *inputs[:4], w, out1, lse1, scale)
    torch.testing.assert_close(out1, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse1, lse, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_named():
    q, k, v, index, weight = case()
    with pytest.raises(TypeError, match="index"):
        chapter_attention(q, k, v, index.int(), weight)
    with pytest.raises(ValueError, match="kv heads"):
        chapter_attention(q[:, :, :3], k, v, index, weight)
    with pytest.raises(TypeError, match="dtype"):
        chapter_attention(q, k.double(), v, index, weight)
