"""Optimizer groups and the learning-rate schedule.

Three groups, each with its own peak learning rate (SPEC 1.5): backbone (--lr), memory layers
(--memory-layer-lr) and the bank (--memory-bank-lr, or frozen with --freeze-memory-bank). Each is
split into a decayed half and a no-decay half (norm weights and biases: every parameter of fewer than
two dimensions). megatron-core's OptimizerParamScheduler sets every group's lr from the group's own
``max_lr`` / ``min_lr`` keys, so all groups follow one schedule shape at their own scale; the minimum
of each group is its peak times --min-lr / --lr. Our keys: ``group`` (which of the three) and ``decay``;
DeepSpeed owns ``name`` for chapter-parallel (expert) groups.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import nn

from moc_megatron.config import Config
from moc_megatron.errors import UserError
from moc_megatron.model.gpt import parameter_groups

# Megatron's decay for the final phase of WSD; the paper does not name one.
WSD_DECAY_STYLE = "linear"


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or name.endswith(".bias")


def group_settings(cfg: Config, group: str, decay: bool) -> dict:
    t = cfg.training
    peak = {"backbone": t.lr, "memory_layers": t.memory_layer_lr, "bank": t.memory_bank_lr}[group]
    return {"max_lr": peak, "min_lr": peak * (t.min_lr / t.lr if t.lr > 0 else 0.0), "wd_mult": float(decay)}


def optimizer_groups(model: nn.Module, cfg: Config, ep_size: int = 1) -> list[dict]:
    """Param-group dicts for the optimizer; freezes the bank when asked (its group is left out).
    With chapter parallelism the bank shards go to DeepSpeed's expert groups (reduced over the
    expert-data-parallel ranks), keeping their settings."""
    groups = []
    for group, named in parameter_groups(model).items():
        if group == "bank" and cfg.training.freeze_memory_bank:
            for _, p in named:
                p.requires_grad_(False)
            continue
        if group == "bank" and cfg.training.memory_bank_optimizer == "sparse_adam":
            continue  # training/bank_optim.py updates it row-sparsely
        for decay in (True, False):
            params = [p for n, p in named if no_weight_decay(n, p) != decay]
            if params:
                settings = group_settings(cfg, group, decay)
                groups.append({"params": params, "name": group if decay else f"{group}.no_decay", "group": group,
                               "decay": decay, "lr": settings["max_lr"], **settings})
    if ep_size > 1:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    return groups


def apply_group_settings(optimizer, cfg: Config) -> None:
    """Set each group's max_lr / min_lr / wd_mult from cfg (after an optimizer state was loaded)."""
    for g in optimizer.param_groups:
        g.update(group_settings(cfg, g["group"], g["decay"]))


def group_lrs(optimizer) -> dict[str, float]:
    """Current lr of each of the three groups (their halves and shards share it)."""
    return {g["group"]: g["lr"] for g in optimizer.param_groups}


class AdamW(torch.optim.AdamW):
    """torch's AdamW whose step can be dropped (--nan-policy skip), under whichever ZeRO stage wraps it:
    nothing of the weights or the moments changes while ``drop_step`` is set.

    Under ZeRO 0 in fp32 DeepSpeed steps it directly, and DeepSpeed's clipping norm there is not the
    model's: it counts a tied embedding once per pipeline stage holding it. There build_engine sets
    ``norm_of_grads`` (global_grad_norm) and ``clip_grad``, and the step clips by the true norm itself;
    ``grad_norm()`` is that norm for the coming step, computed once."""

    drop_step = False
    norm_of_grads = None  # () -> float, under ZeRO 0 in fp32
    clip_grad = 0.0
    last_grad_norm = None  # the norm the last step clipped by
    _norm = None

    def grad_norm(self) -> float:
        if self._norm is None:
            self._norm = self.norm_of_grads()
        return self._norm

    def step(self, closure=None):
        if self.drop_step:
            self._norm = None
            return None
        if self.norm_of_grads is not None:
            self.last_grad_norm, self._norm = self.grad_norm(), None
            if self.clip_grad > 0:  # by clip / (norm + 1e-6) where that is below 1, as DeepSpeed and Megatron
                params = [p for g in self.param_groups for p in g["params"]]
                norm = torch.tensor(self.last_grad_norm, dtype=torch.float64)
                torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm)
        return super().step(closure)


def global_grad_norm(params, ctx, device) -> float:
    """The 2-norm of the whole model's gradient, each gradient counted once however many ranks hold it:
    its data-parallel replicas (the expert-data-parallel ones for a chapter shard), its tensor-parallel
    replicas when megatron-core does not shard it, and a tied weight's copies on other pipeline stages
    (DeepSpeed marks them ``ds_pipe_replicated``). Collective over the world, on ``device``."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    shard_copies = torch.distributed.get_world_size(ctx.expert_dp_group) if ctx.ep_size > 1 else ctx.dp_size
    for p in params:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        copies = shard_copies if getattr(p, "allreduce", True) is False else ctx.dp_size
        if not getattr(p, "tensor_model_parallel", False):
            copies *= ctx.tp_size
        # in fp64: torch's fp32 norm on CPU accumulates sequentially and is 4e-5 off at moc-tiny's embedding
        total += torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) ** 2 / copies
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    return total.sqrt().item()


def build_optimizer(groups: list[dict], cfg: Config) -> AdamW:
    """AdamW, fused when every parameter is on a GPU (torch's default elsewhere)."""
    t = cfg.training
    fused = {"fused": True} if fused_adamw_fits(groups) else {}
    return AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay,
                 **fused)


def fused_adamw_fits(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def build_scheduler(optimizer, cfg: Config) -> OptimizerParamScheduler:
    """Megatron's schedule; resuming takes this run's settings and the checkpoint's step count."""
    t = cfg.training
    if t.lr_decay_iters < 1:
        raise UserError(f"--lr-decay-iters={t.lr_decay_iters}: must be at least 1")
    if t.lr_warmup_iters and t.lr_warmup_iters >= t.lr_decay_iters:
        raise UserError(f"--lr-warmup-iters={t.lr_warmup_iters}: must be below --lr-decay-iters={t.lr_decay_iters}")
    if t.lr_decay_style == "WSD" and not 0 < t.lr_wsd_decay_iters <= t.lr_decay_iters:
        raise UserError(f"--lr-wsd-decay-iters={t.lr_wsd_decay_iters}: must be in [1, --lr-decay-iters="
                        f"{t.lr_decay_iters}]")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.lr_decay_iters, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        wsd_decay_steps=t.lr_wsd_decay_iters, lr_wsd_decay_style=WSD_DECAY_STYLE)
