"""Triton chapter attention (SPEC 2.2) against a naive float64 reference, run on CPU by Triton's interpreter."""

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

MODULE = "moc_megatron.ops.triton_attention"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = "MOC_TRITON_INTERPRET_CHILD"


def _interpreter_usable_here() -> bool:
    """Triton chooses interpreter or compiler when it decorates a function: its own library (tl.sum, ...) at
    `import triton`, lazily imported parts at the first launch, our kernels at import. So TRITON_INTERPRET=1 must be
    set before triton is first imported and stay set. Once something (megatron-core does) imported triton without it,
    this process cannot interpret, and test_kernel_tests_pass_in_a_fresh_interpreter_process runs them in a child.
    With a GPU we also leave this process alone, so that GPU tests collected later keep compiled kernels."""
    if os.environ.get(CHILD_ENV) == "1":
        return True
    if "triton" in sys.modules:
        import triton
        import triton.language as tl

        return not isinstance(tl.sum, triton.runtime.JITFunction)
    return not torch.cuda.is_available()


IN_PROCESS = _interpreter_usable_here()
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"
    ta = importlib.import_module(MODULE)
    IN_PROCESS = ta._interpreted()  # False if the kernel module was imported before the variable was set
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="this process cannot run Triton's interpreter; "
                                 "test_kernel_tests_pass_in_a_fresh_interpreter_process runs these tests")


def naive_chapter_attention(q, k, v, index, weight, scale):
    """Per unit: gather the used chapters' K/V, scale them by their weights, plain softmax attention (SPEC 1.3)."""
    U, c, h, e = q.shape
    group = h // k.shape[2]
    outs, lses = [], []
    for b in range(U):
        slots = [s for s in range(index.shape[1]) if index[b, s] >= 0]
        if not slots:
            outs.append(q.new_zeros(c, h, e))
            lses.append(q.new_full((c, h), float("-inf")))
            continue
        keys = torch.cat([weight[b, s] * k[index[b, s]] for s in slots]).repeat_interleave(group, dim=1)
        values = torch.cat([weight[b, s] * v[index[b, s]] for s in slots]).repeat_interleave(group, dim=1)
        scores = torch.einsum("ihe,jhe->hij", q[b], keys) * scale
        outs.append(torch.einsum("hij,jhe->ihe", scores.softmax(-1), values))
        lses.append(scores.logsumexp(-1).transpose(0, 1))
    return torch.stack(outs), torch.stack(lses)


def reference(q, k, v, index, weight, scale, dout, dlse):
    """out, lse and the gradients of sum(out * dout) + sum(lse * dlse), in float64 through autograd."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, weight)]
    out, lse = naive_chapter_attention(leaves[0], leaves[1], leaves[2], index, leaves[3], scale)
    used = torch.isfinite(lse)
    loss = (out * dout.double()).sum() + (lse[used] * dlse.double()[used]).sum()
    loss.backward()
    return (out.detach(), lse.detach(), *(x.grad for x in leaves))


# index rows: a duplicate row within unit 0, row 2 read by units 0 and 1, unit 2 with no used slot, row 5 read by none
INDEX = [[0, 2, -1, 2], [2, 1, 3, -1], [-1, -1, -1, -1], [4, 0, 4, 1]]
CASES = {
    # GQA h=4 over kv=2; t=5 pads to a 16-token tile; c * h/kv = 42 rows: blocks of 32 (fp32) or 64, the last ragged
    "gqa_t5_ragged": dict(c=21, h=4, kv=2, e=16, u=6, t=5, index=INDEX),
    # one head per kv head; e=24 pads to 32; t=16 fills the tile exactly
    "mha_e24_t16": dict(c=8, h=2, kv=2, e=24, u=6, t=16, index=INDEX),
    # for the structural tests: as small as the interpreter likes
    "small": dict(c=3, h=4, kv=2, e=16, u=6, t=5, index=INDEX),
}


def make_inputs(c, h, kv, e, u, t, index, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.tensor(index, dtype=torch.int64)
    U, n = index.shape
    q = torch.randn(U, c, h, e, generator=g).to(dtype)
    k = torch.randn(u, t, kv, e, generator=g).to(dtype)
    v = torch.randn(u, t, kv, e, generator=g).to(dtype)
    weight = 0.5 + torch.rand(U, n, generator=g)  # unused slots get weights too: they must be ignored
    dout = torch.randn(U, c, h, e, generator=g).to(dtype)
    dlse = torch.randn(U, c, h, generator=g)
    return q, k, v, index, weight, e**-0.5, dout, dlse


def run_triton(q, k, v, index, weight, scale, dout, dlse):
    out, lse = ta.chapter_attention_fwd(q, k, v, index, weight, scale)
    grads = ta.chapter_attention_bwd(dout, dlse, q, k, v, index, weight, out, lse, scale)
    return (out, lse, *grads)


NAMES = ("out", "lse", "dq", "dk", "dv", "dweight")


def assert_matches(got, want, rtol, atol_scale):
    for name, a, b in zip(NAMES, got, want):
        used = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), used), f"{name}: -inf pattern differs"
        b = b[used] if name == "lse" else b
        a = a[used] if name == "lse" else a
        atol = atol_scale * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@interpreted
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_forward_and_backward_match_naive_reference(case):
    inputs = make_inputs(**CASES[case], dtype=torch.float32)
    got = run_triton(*inputs)
    assert [x.dtype for x in got] == [torch.float32] * 6
    # the interpreter's tl.dot is numpy fp32; what is left is fp32 rounding of exp/log and of the sums
    assert_matches(got, reference(*inputs), rtol=1e-5, atol_scale=1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference_of_rounded_inputs(dtype):
    inputs = make_inputs(**CASES["gqa_t5_ragged"], dtype=dtype)
    got = run_triton(*inputs)
    assert [x.dtype for x in got] == [dtype, torch.float32, dtype, dtype, dtype, torch.float32]
    # unit-scale data; the kernels round p and ds to the input dtype for the dots, as flash attention does
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert_matches(got, reference(*inputs), rtol=tol, atol_scale=tol)


@interpreted
def test_unused_slots_and_empty_units_contribute_nothing():
    q, k, v, index, weight, scale, dout, dlse = make_inputs(**CASES["small"], dtype=torch.float32)
    out, lse, dq, dk, dv, dweight = run_triton(q, k, v, index, weight, scale, dout, dlse)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and bool((lse[2] == float("-inf")).all())
    assert torch.equal(dq[2], torch.zeros_like(dq[2]))
    assert torch.equal(dweight[index < 0], torch.zeros(int((index < 0).sum())))
    assert torch.equal(dk[5], torch.zeros_like(dk[5])) and torch.equal(dv[5], torch.zeros_like(dv[5]))
    assert not any(x.isnan().any() for x in (out, lse, dq, dk, dv, dweight))
    # changing the weight of an unused slot changes nothing
    weight2 = torch.where(index < 0, weight + 3.0, weight)
    out2, lse2 = ta.chapter_attention_fwd(q, k, v, index, weight2, scale)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


@interpreted
def test_two_runs_are_bitwise_equal():
    inputs = make_inputs(**CASES["small"], dtype=torch.bfloat16, seed=1)
    first, second = run_triton(*inputs), run_triton(*inputs)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@interpreted
def test_float64_is_rejected_with_type_error():
    q, k, v, index, weight, scale, _, _ = make_inputs(**CASES["small"], dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ta.chapter_attention_fwd(q, k, v, index, weight, scale)


def _python(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", CHILD_ENV)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def test_kernel_tests_pass_in_a_fresh_interpreter_process():
    if IN_PROCESS:
        pytest.skip("the kernel tests run in this process")
    result = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                     "-k", "not (fresh_interpreter_process or late_interpreter or without_triton)",
                     env={CHILD_ENV: "1", "TRITON_INTERPRET": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_late_interpreter_setting_raises_a_clear_error():
    result = _python("-c", textwrap.dedent(f"""
        import os, torch, triton
        os.environ["TRITON_INTERPRET"] = "1"   # too late: triton's library is already compiled-mode
        from {MODULE} import chapter_attention_fwd
        q, k = torch.randn(1, 3, 2, 16), torch.randn(2, 4, 1, 16)
        try:
            chapter_attention_fwd(q, k, k, torch.tensor([[1, -1]]), torch.ones(1, 2), 0.25)
        except RuntimeError as e:
            assert "before triton is first imported" in str(e), e
            print("ok")
    """))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_module_imports_without_triton_and_reports_unavailable():
    result = _python("-c", textwrap.dedent(f"""
        import sys
        sys.modules["triton"] = None   # import triton now raises ImportError
        import moc_megatron.ops, torch
        from {MODULE} import AVAILABLE, chapter_attention_fwd
        assert AVAILABLE is False
        try:
            chapter_attention_fwd(*[torch.zeros(1, 1, 1, 16)] * 3, torch.zeros(1, 1, dtype=torch.int64),
                                  torch.ones(1, 1), 1.0)
        except RuntimeError as e:
            assert "triton is not installed" in str(e)
            print("ok")
    """))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
