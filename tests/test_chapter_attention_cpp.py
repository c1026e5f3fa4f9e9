"""The C++ CPU chapter-attention kernel (csrc/chapter_attention.cpp) against a naive reference.

The reference loops over units, gathers each unit's valid chapters explicitly (K and V times the
chapter weight), repeats K/V heads for GQA and runs plain softmax attention in float64; gradients are
autograd's through it. Letters: U units, c queries per unit, h query heads, kv K/V heads, e head dim,
n slots per unit, t tokens per chapter, u table rows.
"""

import math

import pytest
import torch

_C = pytest.importorskip("moc_megatron._C")
if not hasattr(_C, "chapter_attention_fwd"):
    pytest.skip("moc_megatron._C was built without chapter attention", allow_module_level=True)

# index rows: duplicates within unit 0 (row 2) and across units 0 / 2 (row 0), unit 1 has no valid slot
MIXED_INDEX = [[0, 2, -1, 2], [-1, -1, -1, -1], [5, 1, 0, 3]]


def naive_attention(q, k, v, index, weight, scale):
    """out (U, c, h, e), lse (U, c, h) in q's dtype (run it in float64)."""
    U, c, h, e = q.shape
    group = h // k.shape[2]
    outs, lses = [], []
    for b in range(U):
        slots = [s for s in range(index.shape[1]) if int(index[b, s]) >= 0]
        if not slots:
            outs.append(q.new_zeros(c, h, e))
            lses.append(q.new_full((c, h), -math.inf))
            continue
        kb = torch.cat([k[int(index[b, s])] * weight[b, s] for s in slots])  # (keys, kv, e)
        vb = torch.cat([v[int(index[b, s])] * weight[b, s] for s in slots])
        kb, vb = kb.repeat_interleave(group, 1), vb.repeat_interleave(group, 1)  # head i reads kv head i // group
        scores = torch.einsum("che,lhe->hcl", q[b], kb) * scale
        lses.append(scores.logsumexp(-1).T)
        outs.append(torch.einsum("hcl,lhe->che", scores.softmax(-1), vb))
    return torch.stack(outs), torch.stack(lses)


def naive_grads(q, k, v, index, weight, scale, dout, dlse):
    """Autograd of naive_attention in float64: dq, dk, dv, dweight."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, weight)]
    out, lse = naive_attention(leaves[0], leaves[1], leaves[2], index, leaves[3], scale)
    finite = torch.isfinite(lse)
    loss = (out * dout.double()).sum() + torch.where(finite, lse * dlse.double(), 0.0).sum()
    return torch.autograd.grad(loss, leaves)


def make_case(U=3, c=7, h=4, kv=2, e=8, n=4, t=5, u=6, index=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(U, c, h, e, generator=gen).to(dtype)
    k = torch.randn(u, t, kv, e, generator=gen).to(dtype)
    v = torch.randn(u, t, kv, e, generator=gen).to(dtype)
    index = torch.randint(0, u, (U, n), generator=gen) if index is None else torch.tensor(index)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(U, n, generator=gen) + 0.5).to(stats)
    dout = torch.randn(U, c, h, e, generator=gen).to(dtype)
    dlse = torch.randn(U, c, h, generator=gen).to(stats)
    return dict(q=q, k=k, v=v, index=index, weight=weight, scale=e ** -0.5), dout, dlse


def run(case, dout, dlse):
    out, lse = _C.chapter_attention_fwd(case["q"], case["k"], case["v"], case["index"], case["weight"],
                                        case["scale"])
    grads = _C.chapter_attention_bwd(dout, dlse, case["q"], case["k"], case["v"], case["index"], case["weight"],
                                     out, lse, case["scale"])
    return (out, lse, *grads)


def assert_close(actual, expected, rtol, atol_rel, what):
    expected = expected.double()
    atol = atol_rel * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


CASES = {
    "gqa_mixed_slots": dict(index=MIXED_INDEX),                      # GQA 4:2, -1 slots, an empty unit, dups
    "mha_c1": dict(c=1, h=2, kv=2, index=MIXED_INDEX),
    "t5_many_units": dict(U=5, c=3, n=3, t=5, u=4),                  # random rows, duplicates likely
    "blocks": dict(U=2, c=300, h=2, kv=1, e=16, n=6, t=64, u=7),     # several query blocks and chapter steps
}


@pytest.mark.parametrize("name", CASES)
def test_fp32_forward_matches_naive_reference(name):
    case, _, _ = make_case(**CASES[name])
    out, lse = _C.chapter_attention_fwd(case["q"], case["k"], case["v"], case["index"], case["weight"],
                                        case["scale"])
    ref_out, ref_lse = naive_attention(*(case[x].double() for x in ("q", "k", "v")), case["index"],
                                       case["weight"].double(), case["scale"])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert_close(out, ref_out, 1e-5, 1e-6, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert_close(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), 1e-5, 1e-6, "lse")


@pytest.mark.parametrize("name", CASES)
def test_fp32_backward_matches_autograd_of_naive_reference(name):
    case, dout, dlse = make_case(**CASES[name])
    _, _, dq, dk, dv, dweight = run(case, dout, dlse)
    expected = naive_grads(case["q"], case["k"], case["v"], case["index"], case["weight"], case["scale"], dout, dlse)
    for what, got, ref in zip(("dq", "dk", "dv", "dweight"), (dq, dk, dv, dweight), expected):
        assert got.dtype == (torch.float32)
        assert_close(got, ref, 1e-5, 1e-5, what)


def test_fp64_forward_and_backward_match_to_rounding():
    case, dout, dlse = make_case(dtype=torch.float64, index=MIXED_INDEX)
    out, lse, *grads = run(case, dout, dlse)
    ref_out, ref_lse = naive_attention(case["q"], case["k"], case["v"], case["index"], case["weight"], case["scale"])
    assert out.dtype == lse.dtype == torch.float64
    assert_close(out, ref_out, 1e-12, 1e-12, "out")
    assert_close(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), 1e-12, 1e-12, "lse")
    expected = naive_grads(case["q"], case["k"], case["v"], case["index"], case["weight"], case["scale"], dout, dlse)
    for what, got, ref in zip(("dq", "dk", "dv", "dweight"), grads, expected):
        assert_close(got, ref, 1e-10, 1e-10, what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_its_tolerance(dtype):
    case, dout, dlse = make_case(dtype=dtype, index=MIXED_INDEX)
    out, lse, dq, dk, dv, dweight = run(case, dout, dlse)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dtype
    assert lse.dtype == dweight.dtype == torch.float32
    ref_out, ref_lse = naive_attention(*(case[x].double() for x in ("q", "k", "v")), case["index"],
                                       case["weight"].double(), case["scale"])
    assert_close(out, ref_out, 0, 2e-2, "out")
    assert_close(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), 0, 2e-2, "lse")
    expected = naive_grads(case["q"], case["k"], case["v"], case["index"], case["weight"], case["scale"], dout, dlse)
    for what, got, ref in zip(("dq", "dk", "dv", "dweight"), (dq, dk, dv, dweight), expected):
        assert_close(got, ref, 0, 2e-2, what)


class ChapterAttention(torch.autograd.Function):
    """_C's forward / backward as one differentiable function of q, k, v, weight."""

    @staticmethod
    def forward(ctx, q, k, v, weight, index, scale):
        out, lse = _C.chapter_attention_fwd(q, k, v, index, weight, scale)
        ctx.save_for_backward(q, k, v, weight, index, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, weight, index, out, lse = ctx.saved_tensors
        dq, dk, dv, dweight = _C.chapter_attention_bwd(dout.contiguous(), dlse.contiguous(), q, k, v, index, weight,
                                                       out, lse, ctx.scale)
        return dq, dk, dv, dweight, None, None


def test_fp64_gradcheck_on_tiny_shapes():
    # no empty unit here: its lse is -inf, which finite differences cannot take
    case, _, _ = make_case(U=2, c=2, h=2, kv=1, e=3, n=3, t=2, u=3, dtype=torch.float64,
                           index=[[0, -1, 0], [2, 1, -1]])
    inputs = tuple(case[x].requires_grad_() for x in ("q", "k", "v", "weight"))
    assert torch.autograd.gradcheck(lambda q, k, v, w: ChapterAttention.apply(q, k, v, w, case["index"], case["scale"]),
                                    inputs)


def test_unit_without_valid_slot_gives_zeros_and_no_nan():
    case, dout, dlse = make_case(index=MIXED_INDEX)
    out, lse, dq, dk, dv, dweight = run(case, dout, dlse)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)
    assert torch.all(dq[1] == 0)
    assert torch.all(dweight[torch.tensor(MIXED_INDEX) < 0] == 0)
    unread = [row for row in range(case["k"].shape[0]) if row not in {r for u in MIXED_INDEX for r in u}]
    assert unread and torch.all(dk[unread] == 0) and torch.all(dv[unread] == 0)
    for x in (out, dq, dk, dv, dweight):
        assert not torch.isnan(x).any()


def test_all_slots_unused_everywhere():
    case, dout, dlse = make_case(U=2, n=3, index=[[-1, -1, -1], [-1, -1, -1]])
    out, lse, dq, dk, dv, dweight = run(case, dout, dlse)
    assert torch.all(lse == -math.inf)
    for x in (out, dq, dk, dv, dweight):
        assert torch.all(x == 0)


def test_two_runs_are_bitwise_equal():
    case, dout, dlse = make_case(**CASES["blocks"])
    first, second = run(case, dout, dlse), run(case, dout, dlse)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_the_thread_count():
    # many (unit, kv head) tasks and table rows read by several units
    case, dout, dlse = make_case(U=6, c=40, h=4, kv=2, e=16, n=5, t=16, u=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(case, dout, dlse)
        torch.set_num_threads(2)
        two = run(case, dout, dlse)
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dweight"), one, two):
        assert torch.equal(a, b), name


def test_noncontiguous_inputs_are_accepted():
    case, dout, dlse = make_case(index=MIXED_INDEX)
    expected = run(case, dout, dlse)
    strided = dict(case, q=case["q"].transpose(1, 2).contiguous().transpose(1, 2))
    assert not strided["q"].is_contiguous()
    for a, b in zip(run(strided, dout, dlse), expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change, error, words", [
    (dict(q=torch.zeros(3, 7, 4)), ValueError, "q must be (U, c, h, e)"),
    (dict(k=torch.zeros(6, 5, 3, 8), v=torch.zeros(6, 5, 3, 8)), ValueError, "multiple of k / v heads"),
    (dict(v=torch.zeros(6, 5, 2, 9)), ValueError, "v shape"),
    (dict(k=torch.zeros(6, 5, 2, 8, dtype=torch.float64)), TypeError, "must equal q dtype"),
    (dict(index=torch.zeros(2, 4, dtype=torch.long)), ValueError, "index must be (U, n)"),
    (dict(index=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "index must be int64"),
    (dict(weight=torch.ones(3, 4, dtype=torch.float64)), TypeError, "weight must be Float"),
    (dict(weight=torch.ones(3, 5)), ValueError, "weight shape"),
    (dict(index=torch.tensor([[0, 1, 2, 6]] * 3)), IndexError, "chapter id 6 is out of range"),
    (dict(index=torch.tensor([[0, -2, 2, 1]] * 3)), IndexError, "chapter id -2 is out of range"),
])
def test_bad_arguments_raise_naming_the_op(change, error, words):
    case, _, _ = make_case(index=MIXED_INDEX)
    case.update(change)
    with pytest.raises(error, match="chapter_attention_fwd") as info:
        _C.chapter_attention_fwd(case["q"], case["k"], case["v"], case["index"], case["weight"], case["scale"])
    assert words in str(info.value)


def test_backward_checks_its_gradients_and_saved_tensors():
    case, dout, dlse = make_case(index=MIXED_INDEX)
    out, lse = _C.chapter_attention_fwd(case["q"], case["k"], case["v"], case["index"], case["weight"],
                                        case["scale"])
    args = [dout, dlse, case["q"], case["k"], case["v"], case["index"], case["weight"], out, lse, case["scale"]]
    with pytest.raises(ValueError, match="chapter_attention_bwd: dout must have shape"):
        _C.chapter_attention_bwd(dout[:, :3], *args[1:])
    with pytest.raises(TypeError, match="chapter_attention_bwd: dlse must be Float"):
        _C.chapter_attention_bwd(dout, dlse.double(), *args[2:])
    with pytest.raises(ValueError, match="chapter_attention_bwd: lse must have shape"):
        _C.chapter_attention_bwd(*args[:8], lse[:, :, :1], case["scale"])
