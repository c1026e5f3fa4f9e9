"""Row-sparse Adam for the memory bank (``--memory-bank-optimizer sparse_adam``).

With sparse_grad banks (moc_megatron.model.memory.MemoryBank) a step's bank gradient is a coalesced
torch.sparse_coo tensor holding only the chapters the step read. RowSparseAdam updates exactly those
rows. This is a different update rule from the paper's AdamW, which moves every chapter every step
(moments decay and weight decay apply to chapters that were not read):

    touched rows r:  m_r <- b1 m_r + (1 - b1) g_r;   v_r <- b2 v_r + (1 - b2) g_r^2
                     w_r <- w_r (1 - lr wd) - lr / (1 - b1^s) * m_r / (sqrt(v_r / (1 - b2^s)) + eps)
    other rows:      w, m and v unchanged

s counts the optimizer's steps (as torch.optim.SparseAdam and "lazy" Adam do), so when every row is
touched every step the rule is torch.optim.AdamW's exactly. Dense gradients are accepted and treated
as touching every row.

The moments are fp32 whatever the parameter's dtype, and a bf16 (or fp16) parameter gets an fp32 master
copy that the update is applied to and that is rounded into the parameter's touched rows: an update
below bf16's resolution (late in the schedule) accumulates in the master instead of vanishing.
All of it is in state_dict, in fp32, so a resumed run continues bitwise.

reduce_sparse_grad sums a sparse gradient over a data-parallel or expert-data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RowSparseAdam(torch.optim.Optimizer):
    """Adam with decoupled weight decay that updates only the rows present in each sparse gradient.

    Parameters are (rows, ...) tensors; gradients are sparse with one sparse dimension (the row).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"RowSparseAdam: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        rows, g = touched_rows(p.grad)
        g = g.float()
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if p.dtype != torch.float32:
                state["master"] = p.detach().float()
        state["step"] += 1
        step = state["step"].item()
        (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
        master = state.get("master", p)
        full = (master, state["exp_avg"], state["exp_avg_sq"])
        w, m, v = full if rows is None else (t.index_select(0, rows) for t in full)
        if wd:
            w.mul_(1 - lr * wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(group["eps"])
        w.addcdiv_(m, denom, value=-lr / (1 - b1**step))
        if rows is None:
            if master is not p:
                p.copy_(master)
            return
        for t, new in zip(full, (w, m, v)):  # index_select copied the rows: write them back
            t.index_copy_(0, rows, new)
        if master is not p:
            p.index_copy_(0, rows, w.to(p.dtype))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the state keeps its saved dtypes (torch casts it to the parameter's: a bf16 bank
        would lose its fp32 master and moments) and moves to the parameter's device; ``step`` stays on the CPU."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, saved in state_dict["state"].items():
            p = params[i]
            self.state[p] = {k: v if not isinstance(v, torch.Tensor) else v.clone() if k == "step"
                             else v.to(p.device, copy=True) for k, v in saved.items()}


def touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(row ids, their gradient rows) of a sparse gradient; (None, grad) for a dense one."""
    if not grad.is_sparse:
        return None, grad
    if grad.sparse_dim() != 1:
        raise ValueError(f"RowSparseAdam: gradients must be sparse in the row dimension only, "
                         f"got sparse_dim={grad.sparse_dim()} for shape {tuple(grad.shape)}")
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def reduce_sparse_grad(param: torch.Tensor, group=None, divisor: float | None = None) -> torch.Tensor:
    """Sum param.grad over the ranks of ``group``, divide by ``divisor``, and store it as param.grad.

    Sparse gradients: every rank's row ids and rows are all-gathered (padded to the largest count)
    and coalesced, so the result holds the union of the rows any rank touched. A rank without a
    gradient (it read no row) takes part with an empty one. Dense gradients: all_reduce.
    """
    grad = param.grad
    if grad is None:
        grad = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long, device=param.device),
                                       param.new_empty((0, *param.shape[1:])), param.shape, check_invariants=False)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world > 1 and not grad.is_sparse:
        dist.all_reduce(grad, group=group)
    elif world > 1:
        grad = _all_gather_sparse(grad, group, world)
    param.grad = grad / divisor if divisor else grad
    return param.grad


def _all_gather_sparse(grad: torch.Tensor, group, world: int) -> torch.Tensor:
    rows, values = touched_rows(grad)
    count = torch.tensor([rows.numel()], device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    pad = max(counts) - rows.numel()
    rows = torch.cat([rows, rows.new_zeros(pad)])
    values = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    dist.all_gather(all_values, values.contiguous(), group=group)
    rows = torch.cat([r[:c] for r, c in zip(all_rows, counts)])
    values = torch.cat([v[:c] for v, c in zip(all_values, counts)])
    return torch.sparse_coo_tensor(rows[None], values, grad.shape, check_invariants=False).coalesce()
