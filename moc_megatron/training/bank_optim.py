"""--memory-bank-optimizer sparse_adam: the bank outside DeepSpeed, updated row-sparsely.

The bank's sparse gradients (model/memory.py) are summed over the ranks holding the same chapters
(a routed shard over the expert-data-parallel group, shared chapters over the data-parallel group)
and divided by the DP size, as DeepSpeed treats dense and expert gradients. RowSparseAdam then
updates only the rows some routing unit read; untouched chapters keep their weights and moments (a
different rule from the paper's AdamW). The bank is left out of gradient clipping. Its learning rate
follows the schedule at --memory-bank-lr / --lr of the backbone's, and its state is checkpointed
per rank.
"""

from __future__ import annotations

from moc_megatron.config import Config
from moc_megatron.parallel.state import ParallelContext
from moc_megatron.training.bank_io import local_banks
from moc_megatron.training.sparse_adam import RowSparseAdam, reduce_sparse_grad


class BankOptimizer:
    def __init__(self, model, cfg: Config, ctx: ParallelContext):
        t = cfg.training
        self.ctx, self.ratio = ctx, t.memory_bank_lr / t.lr
        self.params = []  # (parameter, group whose ranks hold the same rows)
        for bank in local_banks(model).values():
            self.params.append((bank.routed, ctx.expert_dp_group if ctx.ep_size > 1 else ctx.dp_group))
            if bank.shared is not None:
                self.params.append((bank.shared, ctx.dp_group))
        self.optimizer = RowSparseAdam([p for p, _ in self.params], lr=t.memory_bank_lr,
                                       betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)

    def step(self, backbone_lr: float, skip: bool) -> None:
        """After the engine's step: reduce, update (unless the step was skipped), clear."""
        if not skip:
            for p, group in self.params:
                reduce_sparse_grad(p, group, divisor=self.ctx.dp_size)
            for g in self.optimizer.param_groups:
                g["lr"] = backbone_lr * self.ratio
            self.optimizer.step()
        for p, _ in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
