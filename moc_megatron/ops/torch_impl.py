"""Pure-torch chapter gather / scatter: the fallback, with the compiled kernels' summation orders.

fp32 results equal csrc/chapter_ops.cpp bitwise: products are rounded before they are summed, the
scatter sums each table row in ascending flat (b * n + j) order and the weight gradient halves a
zero-padded power-of-two buffer. 16-bit inputs accumulate in float32 and round once, as the kernels do.
Letters: b batch, n selected per row, t tokens per chapter, d width, u table rows.
"""

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def check_index(index: torch.Tensor, num_rows: int, op: str) -> None:
    """IndexError naming the offending id, the same message as the compiled kernels.

    The check is an asynchronous device assert, so a GPU never waits for it; on the CPU it fires at
    once and the id is looked up only then."""
    if index.numel() == 0:
        return
    ok = ((index >= 0) & (index < num_rows)).all()
    try:
        torch._assert_async(ok, f"{op}: a chapter id is out of range for a table of {num_rows} rows")
    except RuntimeError:
        lo, hi = (v.item() for v in torch.aminmax(index))
        bad = lo if lo < 0 else hi
        raise IndexError(f"{op}: chapter id {bad} is out of range for a table of {num_rows} rows "
                         f"(valid ids are 0..{num_rows - 1})") from None


def chapter_gather(table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    # table (u, t, d), index (b, n), weight (b, n) -> (b, n, t, d)
    check_index(index, table.shape[0], "chapter_gather")
    out = table[index]
    return out if weight is None else out * weight[..., None, None]


def _scatter_by_rounds(src: torch.Tensor, flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[u] += src[i] for flat[i] == u, in ascending i, one duplicate-free add per round (any device)."""
    # src (m, t, d), flat (m,), out (u, t, d)
    sorted_ids, order = torch.sort(flat, stable=True)
    counts = torch.bincount(sorted_ids, minlength=out.shape[0])
    starts = torch.cumsum(counts, 0) - counts  # (u,) first sorted slot of each row
    rank = torch.arange(flat.numel(), device=flat.device) - starts[sorted_ids]  # position within its row
    for k in range(int(counts.max().item()) if flat.numel() else 0):
        pick = rank == k  # at most one entry per row: a plain indexed add, no races
        out[sorted_ids[pick]] += src[order[pick]]
    return out


def chapter_scatter(grad: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None,
                    num_rows: int) -> torch.Tensor:
    # grad (b, n, t, d), index (b, n), weight (b, n) -> (num_rows, t, d)
    check_index(index, num_rows, "chapter_scatter")
    b, n, t, d = grad.shape
    src = grad.reshape(b * n, t, d).to(_acc_dtype(grad.dtype))
    if weight is not None:
        src = src * weight.reshape(b * n, 1, 1).to(src.dtype)
    out = src.new_zeros((num_rows, t, d))
    flat = index.reshape(-1)
    if grad.device.type == "cpu":
        out.index_add_(0, flat, src)  # on CPU index_add_ adds the source rows in order
    else:
        _scatter_by_rounds(src, flat, out)  # index_add_ on GPUs uses atomics
    return out.to(grad.dtype)


def halving_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum the last dim by repeated halving of a zero-padded power-of-two length (the kernels' order)."""
    # x (r, e) -> (r,)
    e = x.shape[-1]
    padded = 1 << max(e - 1, 0).bit_length()
    if padded > e:
        x = F.pad(x, (0, padded - e))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def chapter_weight_grad(grad: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # grad (b, n, t, d), table (u, t, d), index (b, n) -> (b, n)
    check_index(index, table.shape[0], "chapter_weight_grad")
    b, n, t, d = grad.shape
    acc = _acc_dtype(table.dtype)
    products = (grad.to(acc) * table[index].to(acc)).reshape(b, n, t * d)
    return halving_sum(products).to(table.dtype)


def unique_chapters(chapters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # chapters (b, n) -> unique (u,), inverse (b, n)
    return torch.unique(chapters, sorted=True, return_inverse=True)
