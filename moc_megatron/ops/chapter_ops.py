"""Chapter gather / scatter as torch.library custom ops, with fake kernels and autograd.

Each op runs moc_megatron._C or moc_megatron.ops.torch_impl, chosen per call by the tensors' device
and MOC_OPS_BACKEND (see _backend.py). Letters: b batch, n selected per row, t tokens per chapter,
d width, u table rows.
"""

import torch
from torch import Tensor

from moc_megatron.ops._backend import kernels_for

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_gather_args(table: Tensor, index: Tensor, weight: Tensor | None, op: str = "chapter_gather") -> None:
    if table.dim() != 3:
        raise ValueError(f"{op}: table must be (u, t, d), got shape {tuple(table.shape)}")
    if table.dtype not in _FLOATS:
        raise TypeError(f"{op}: table dtype {table.dtype} is not one of {_FLOATS}")
    if index.dim() != 2 or index.dtype != torch.int64:
        raise TypeError(f"{op}: index must be (b, n) int64, got {tuple(index.shape)} {index.dtype}")
    if index.device != table.device:
        raise ValueError(f"{op}: index is on {index.device}, table on {table.device}")
    if weight is None:
        return
    if weight.shape != index.shape or weight.dtype != table.dtype or weight.device != table.device:
        raise TypeError(f"{op}: weight must be {tuple(index.shape)} {table.dtype} on {table.device}, "
                        f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}")


def _check_scatter_args(grad: Tensor, index: Tensor, weight: Tensor | None, num_rows: int) -> None:
    if grad.dim() != 4 or grad.dtype not in _FLOATS:
        raise TypeError(f"chapter_scatter: grad must be (b, n, t, d) float, got {tuple(grad.shape)} {grad.dtype}")
    if num_rows < 0:
        raise ValueError(f"chapter_scatter: num_rows must be >= 0, got {num_rows}")
    table_like = grad.new_empty((0, grad.shape[2], grad.shape[3]))
    _check_gather_args(table_like, index, weight, "chapter_scatter")
    if tuple(index.shape) != tuple(grad.shape[:2]):
        raise ValueError(f"chapter_scatter: index {tuple(index.shape)} must match grad's (b, n) {tuple(grad.shape)}")


@torch.library.custom_op("moc_ops::chapter_gather", mutates_args=())
def _gather(table: Tensor, index: Tensor, weight: Tensor | None) -> Tensor:
    return kernels_for(table.device).chapter_gather(table, index, weight)


@_gather.register_fake
def _(table, index, weight):
    return table.new_empty((*index.shape, *table.shape[1:]))


@torch.library.custom_op("moc_ops::chapter_scatter", mutates_args=())
def _scatter(grad: Tensor, index: Tensor, weight: Tensor | None, num_rows: int) -> Tensor:
    return kernels_for(grad.device).chapter_scatter(grad, index, weight, num_rows)


@_scatter.register_fake
def _(grad, index, weight, num_rows):
    return grad.new_empty((num_rows, *grad.shape[2:]))


@torch.library.custom_op("moc_ops::chapter_weight_grad", mutates_args=())
def _weight_grad(grad: Tensor, table: Tensor, index: Tensor) -> Tensor:
    return kernels_for(table.device).chapter_weight_grad(grad, table, index)


@_weight_grad.register_fake
def _(grad, table, index):
    return table.new_empty(index.shape)


# The three ops are closed under differentiation (each one's gradients are the other two), so
# double backward works too.
def _gather_setup_context(ctx, inputs, output):
    table, index, weight = inputs
    ctx.num_rows = table.shape[0]
    needs_table = weight is not None and weight.requires_grad  # only d_weight reads the table
    ctx.save_for_backward(table if needs_table else None, index, weight)


def _gather_backward(ctx, grad):
    # grad (b, n, t, d) -> d_table (u, t, d), None, d_weight (b, n)
    table, index, weight = ctx.saved_tensors
    d_table = _scatter(grad, index, weight, ctx.num_rows) if ctx.needs_input_grad[0] else None
    d_weight = _weight_grad(grad, table, index) if ctx.needs_input_grad[2] else None
    return d_table, None, d_weight


def _scatter_setup_context(ctx, inputs, output):
    grad, index, weight, _ = inputs
    ctx.save_for_backward(grad, index, weight)


def _scatter_backward(ctx, d_out):
    # d_out (u, t, d) -> d_grad (b, n, t, d), None, d_weight (b, n), None
    grad, index, weight = ctx.saved_tensors
    d_grad = _gather(d_out, index, weight) if ctx.needs_input_grad[0] else None
    d_weight = _weight_grad(grad, d_out, index) if ctx.needs_input_grad[2] else None
    return d_grad, None, d_weight, None


def _weight_grad_setup_context(ctx, inputs, output):
    grad, table, index = inputs
    ctx.save_for_backward(grad, table, index)


def _weight_grad_backward(ctx, d_out):
    # d_out (b, n) -> d_grad (b, n, t, d), d_table (u, t, d), None
    grad, table, index = ctx.saved_tensors
    d_grad = _gather(table, index, d_out) if ctx.needs_input_grad[0] else None
    d_table = _scatter(grad, index, d_out, table.shape[0]) if ctx.needs_input_grad[1] else None
    return d_grad, d_table, None


_gather.register_autograd(_gather_backward, setup_context=_gather_setup_context)
_scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup_context)
_weight_grad.register_autograd(_weight_grad_backward, setup_context=_weight_grad_setup_context)


def chapter_gather(table: Tensor, index: Tensor, weight: Tensor | None = None) -> Tensor:
    """out[b, j] = weight[b, j] * table[index[b, j]]; differentiable in table and weight.

    table (u, t, d) float, index (b, n) int64 in [0, u), weight (b, n) like table or None (ones)
    -> (b, n, t, d). The table gradient is the deterministic chapter scatter.
    """
    _check_gather_args(table, index, weight)
    return _gather(table, index, weight)


def chapter_scatter(grad_out: Tensor, index: Tensor, weight: Tensor | None, num_rows: int) -> Tensor:
    """grad_table[u] = sum over index[b, j] == u of weight[b, j] * grad_out[b, j], in ascending b * n + j.

    grad_out (b, n, t, d), index (b, n), weight (b, n) or None -> (num_rows, t, d). No atomics:
    bitwise repeatable, and equal across the cpp and torch paths in fp32.
    """
    _check_scatter_args(grad_out, index, weight, num_rows)
    return _scatter(grad_out, index, weight, num_rows)


def chapter_weight_grad(grad_out: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """grad_weight[b, j] = sum_{t, d} grad_out[b, j] * table[index[b, j]]; (b, n, t, d) -> (b, n)."""
    _check_gather_args(table, index, None, "chapter_weight_grad")
    if grad_out.shape != (*index.shape, *table.shape[1:]) or grad_out.dtype != table.dtype:
        raise ValueError(f"chapter_weight_grad: grad_out {tuple(grad_out.shape)} {grad_out.dtype} does not match "
                         f"index {tuple(index.shape)} and table {tuple(table.shape)} {table.dtype}")
    return _weight_grad(grad_out, table, index)
