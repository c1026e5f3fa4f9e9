"""Chapter gather / scatter ops against a naive reference, across the cpp and torch paths.

Letters: b batch, n selected per row, t tokens per chapter, d width, u table rows.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moc_megatron.ops as ops
from moc_megatron.errors import UserError
from moc_megatron.ops import _backend, torch_impl

REPO = Path(__file__).resolve().parents[1]
BUILT = _backend.EXTENSION is not None
BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(not BUILT, reason="moc_megatron._C not built")), "torch"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, request.param)
    return request.param


def _index(b, n, u, gen):
    """Random ids with both table ends, duplicates within a row and across the batch."""
    index = torch.randint(0, u, (b, n), generator=gen)
    if b * n >= 4:
        index[0, 0], index[-1, -1] = 0, u - 1
        index[0, -1] = index[0, 0]  # duplicate within a row
        index[-1, 0] = index[0, 0]  # duplicate across the batch
    return index


def _case(b=3, n=5, u=7, t=4, d=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(u, t, d, generator=gen).to(dtype)
    weight = torch.rand(b, n, generator=gen).to(dtype)
    grad = torch.randn(b, n, t, d, generator=gen).to(dtype)
    return table, _index(b, n, u, gen), weight, grad


# Independent references: python loops over (b, j), summing in ascending flat order.
def naive_gather(table, index, weight):
    out = torch.empty(*index.shape, *table.shape[1:], dtype=table.dtype)
    for b in range(index.shape[0]):
        for j in range(index.shape[1]):
            out[b, j] = table[int(index[b, j])] * (1 if weight is None else weight[b, j])
    return out


def naive_scatter(grad, index, weight, num_rows):
    out = torch.zeros(num_rows, *grad.shape[2:], dtype=torch.float64)
    for b in range(index.shape[0]):
        for j in range(index.shape[1]):
            w = 1.0 if weight is None else float(weight[b, j])
            out[int(index[b, j])] += w * grad[b, j].double()
    return out


def naive_weight_grad(grad, table, index):
    out = torch.zeros(index.shape, dtype=torch.float64)
    for b in range(index.shape[0]):
        for j in range(index.shape[1]):
            out[b, j] = (grad[b, j].double() * table[int(index[b, j])].double()).sum()
    return out


def _forward_backward(table, index, weight, grad):
    table = table.detach().requires_grad_()
    weight = None if weight is None else weight.detach().requires_grad_()
    out = ops.chapter_gather(table, index, weight)
    out.backward(grad)
    return out.detach(), table.grad, None if weight is None else weight.grad


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_matches_naive_reference(backend, dtype, weighted):
    table, index, weight, _ = _case(dtype=dtype)
    weight = weight if weighted else None
    assert torch.equal(ops.chapter_gather(table, index, weight), naive_gather(table, index, weight))


@pytest.mark.parametrize("weighted", [True, False])
def test_scatter_matches_naive_reference(backend, weighted):
    table, index, weight, grad = _case(b=6, n=9, u=5)
    weight = weight if weighted else None
    got = ops.chapter_scatter(grad, index, weight, table.shape[0])
    torch.testing.assert_close(got.double(), naive_scatter(grad, index, weight, 5), rtol=1e-6, atol=1e-6)


def test_backward_matches_naive_reference(backend):
    table, index, weight, grad = _case(b=4, n=6, u=5, t=3, d=37)
    out, grad_table, grad_weight = _forward_backward(table, index, weight, grad)
    torch.testing.assert_close(grad_table.double(), naive_scatter(grad, index, weight, 5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_weight.double(), naive_weight_grad(grad, table, index), rtol=1e-6, atol=1e-5)


def test_gradcheck_fp64_table_and_weight(backend):
    table, index, weight, _ = _case(b=2, n=4, u=5, t=2, d=3, dtype=torch.float64)
    table.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda tb, w: ops.chapter_gather(tb, index, w), (table, weight))
    assert torch.autograd.gradcheck(lambda tb: ops.chapter_gather(tb, index), (table,))
    assert torch.autograd.gradgradcheck(lambda tb, w: ops.chapter_gather(tb, index, w), (table, weight))


@pytest.mark.skipif(not BUILT, reason="moc_megatron._C not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 40, 7, 3, 50), (3, 11, 4, 3, 500), (2, 3, 9, 1, 1)])
def test_cpp_and_torch_paths_agree_bitwise(monkeypatch, dtype, shape):
    b, n, u, t, d = shape  # t * d = 1500 spans two of the C++ scatter's 1024-element chunks
    case = _case(b, n, u, t, d, dtype=dtype, seed=1)
    results = {}
    for name in ("cpp", "torch"):
        monkeypatch.setenv(_backend.ENV_VAR, name)
        results[name] = _forward_backward(*case)
    for got, want in zip(results["cpp"], results["torch"]):
        assert torch.equal(got, want)


def test_backward_is_bitwise_repeatable(backend):
    case = _case(b=16, n=8, u=3, t=4, d=33, seed=2)  # every row summed from ~40 entries
    first, second = _forward_backward(*case), _forward_backward(*case)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("b,n", [(0, 4), (3, 0), (0, 0)])
def test_empty_selection_gives_empty_output_and_zero_grads(backend, b, n):
    table = torch.randn(5, 2, 3, requires_grad=True)
    weight = torch.rand(b, n, requires_grad=True)
    out = ops.chapter_gather(table, torch.zeros(b, n, dtype=torch.int64), weight)
    assert out.shape == (b, n, 2, 3)
    out.sum().backward()
    assert torch.equal(table.grad, torch.zeros_like(table))
    assert weight.grad.shape == (b, n)


def test_duplicates_and_table_ends_sum_into_their_rows(backend):
    table = torch.randn(4, 2, 3)
    index = torch.tensor([[0, 3, 0], [3, 3, 0]])  # ends of the table, repeats in a row and across rows
    weight = torch.tensor([[0.5, 1.0, 2.0], [3.0, 0.25, 1.5]])
    grad = torch.randn(2, 3, 2, 3)
    grad_table = ops.chapter_scatter(grad, index, weight, 4)
    torch.testing.assert_close(grad_table[0], 0.5 * grad[0, 0] + 2.0 * grad[0, 2] + 1.5 * grad[1, 2])
    torch.testing.assert_close(grad_table[3], 1.0 * grad[0, 1] + 3.0 * grad[1, 0] + 0.25 * grad[1, 1])
    assert torch.equal(grad_table[1:3], torch.zeros(2, 2, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32_reference_to_rounding(backend, dtype):
    table, index, weight, grad = _case(b=4, n=6, u=5, t=4, d=16, dtype=dtype)
    out, grad_table, grad_weight = _forward_backward(table, index, weight, grad)
    assert out.dtype == grad_table.dtype == grad_weight.dtype == dtype
    tol = {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out.double(), naive_gather(table.double(), index, weight.double()), **tol)
    torch.testing.assert_close(grad_table.double(), naive_scatter(grad, index, weight, 5), **tol)
    torch.testing.assert_close(grad_weight.double(), naive_weight_grad(grad, table, index), rtol=2e-2, atol=5e-2)


def test_non_contiguous_inputs_match_contiguous(backend):
    table, index, weight, grad = _case(b=4, n=6, u=5, t=4, d=8)
    table_nc = table.transpose(1, 2).contiguous().transpose(1, 2)  # (u, t, d) with d strided
    index_nc = torch.stack([index, index], dim=2)[..., 0]  # stride 2 along n
    weight_nc = weight.t().contiguous().t()
    grad_nc = grad.transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(x.is_contiguous() for x in (table_nc, index_nc, weight_nc, grad_nc))
    want = _forward_backward(table, index, weight, grad)
    got = _forward_backward(table_nc, index_nc, weight_nc, grad_nc)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    row = ops.chapter_gather(table, index[1:2], weight[1:2])[0]  # a sliced (offset) index and weight
    assert torch.equal(ops.chapter_gather(table, index, weight)[1], row)


@pytest.mark.parametrize("bad", [-1, 7])
def test_out_of_range_index_raises_index_error(backend, bad):
    table, index, weight, grad = _case(u=7)
    index[1, 2] = bad
    with pytest.raises(IndexError, match=f"chapter id {bad} is out of range for a table of 7 rows"):
        ops.chapter_gather(table, index, weight)
    with pytest.raises(IndexError, match="out of range"):
        ops.chapter_scatter(grad, index, weight, 7)


def test_bad_shapes_and_dtypes_raise_clear_errors():
    table, index, weight, _ = _case()
    with pytest.raises(TypeError, match="index must be"):
        ops.chapter_gather(table, index.int(), weight)
    with pytest.raises(TypeError, match="weight must be"):
        ops.chapter_gather(table, index, weight.double())
    with pytest.raises(ValueError, match="table must be"):
        ops.chapter_gather(table[0], index, weight)


@pytest.mark.parametrize("with_gaps", [True, False])
def test_unique_chapters_matches_torch_unique(backend, with_gaps):
    high = 10**12 if with_gaps else 4097  # wide ids take the sort path, chapter ids the lookup table
    chapters = _index(8, 65, high, torch.Generator().manual_seed(3))
    unique, inverse = ops.unique_chapters(chapters)
    want_unique, want_inverse = torch.unique(chapters, sorted=True, return_inverse=True)
    assert torch.equal(unique, want_unique) and torch.equal(inverse, want_inverse)
    assert torch.equal(unique[inverse], chapters)
    empty_unique, empty_inverse = ops.unique_chapters(torch.zeros(0, 3, dtype=torch.int64))
    assert empty_unique.shape == (0,) and empty_inverse.shape == (0, 3)


def test_scatter_by_rounds_equals_cpu_index_add_bitwise():
    # The torch path's deterministic scatter for GPUs, checked where it can run: on the CPU.
    _, index, weight, grad = _case(b=12, n=7, u=4, t=3, d=21, seed=4)
    src = (grad * weight[..., None, None]).reshape(-1, 3, 21)
    want = torch.zeros(4, 3, 21).index_add_(0, index.reshape(-1), src)
    assert torch.equal(torch_impl._scatter_by_rounds(src, index.reshape(-1), torch.zeros(4, 3, 21)), want)


def test_halving_sum_matches_naive_sum():
    x = torch.randn(3, 2, 37, dtype=torch.float64)
    torch.testing.assert_close(torch_impl.halving_sum(x), x.sum(-1))
    assert torch.equal(torch_impl.halving_sum(torch.zeros(2, 0)), torch.zeros(2))


def test_custom_ops_pass_opcheck(backend):
    table, index, weight, grad = _case(b=2, n=3, u=4, t=2, d=3, dtype=torch.float64)
    gather = torch.ops.moc_ops.chapter_gather.default
    torch.library.opcheck(gather, (table.requires_grad_(), index, weight.requires_grad_()))
    torch.library.opcheck(gather, (table, index, None))
    torch.library.opcheck(torch.ops.moc_ops.chapter_scatter.default, (grad, index, weight, 4))
    torch.library.opcheck(torch.ops.moc_ops.chapter_weight_grad.default, (grad, table.detach(), index))


def test_backend_reports_the_path_cpu_tensors_take(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    gpu = BUILT and _backend.EXTENSION.with_cuda and torch.cuda.is_available()
    assert ops.backend() == ("cuda" if gpu else "cpp" if BUILT else "torch")
    assert _backend.kernels_for(torch.device("cpu")) is (_backend.EXTENSION if BUILT else torch_impl)
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert ops.backend() == "torch"
    assert _backend.kernels_for(torch.device("cpu")) is torch_impl


def test_built_extension_is_loaded():
    if not list((REPO / "moc_megatron").glob("_C*.so")):
        pytest.skip("moc_megatron._C not built")
    assert BUILT, "moc_megatron/_C*.so exists but did not load: rebuild it against this torch"


def test_unknown_backend_value_is_a_user_error(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(UserError, match="MOC_OPS_BACKEND='fast' is not one of auto, torch, cpp"):
        ops.backend()


def test_missing_extension_falls_back_to_torch_and_forcing_cpp_is_a_user_error(monkeypatch):
    monkeypatch.setattr(_backend, "EXTENSION", None)
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert ops.backend() == "torch"
    table, index, weight, _ = _case()
    assert torch.equal(ops.chapter_gather(table, index, weight), naive_gather(table, index, weight))
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")
    with pytest.raises(UserError, match="MOC_OPS_BACKEND=cpp but moc_megatron._C is not built"):
        ops.backend()
    with pytest.raises(UserError, match="is not built"):
        ops.chapter_gather(table, index, weight)


def test_env_var_forces_the_path_in_a_fresh_process():
    code = ("import sys; sys.modules['moc_megatron._C'] = None\n"  # the extension cannot be imported
            "import moc_megatron.ops as ops, torch\n"
            "print(ops.backend(), ops.chapter_gather(torch.ones(2, 1, 1), torch.tensor([[1]])).item())\n")
    env = {**os.environ, _backend.ENV_VAR: "torch"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch", "1.0"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_cpu(monkeypatch, dtype):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    if not (BUILT and _backend.EXTENSION.with_cuda):
        pytest.skip("moc_megatron._C was built without CUDA")
    case = _case(b=6, n=9, u=5, t=4, d=40, dtype=dtype, seed=5)
    cpu = _forward_backward(*case)
    cuda = _forward_backward(*(x.cuda() for x in case))
    assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[1].cpu(), cpu[1])  # same rounding, same order
    torch.testing.assert_close(cuda[2].cpu(), cpu[2], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    again = _forward_backward(*(x.cuda() for x in case))
    assert all(torch.equal(a, b) for a, b in zip(cuda, again))
    index = case[1].cuda().clone()
    index[0, 0] = 5
    with pytest.raises(IndexError, match="out of range"):
        ops.chapter_gather(case[0].cuda(), index, case[2].cuda())
