"""One optimizer step, and one evaluation batch, on the DeepSpeed engine.

``Steps`` is the interface the trainer uses: ``train(batches, iteration)`` and ``evaluate(batches)``.
``PipelineSteps`` (pipeline_step.py) is the same interface on DeepSpeed's PipelineEngine; ``steps_for``
picks one, so trainer.py never asks which engine it drives.

DeepSpeed wants ``engine.step()`` after every micro-batch and updates at the accumulation boundary.
Before that last call the step's losses are averaged over the data-parallel group (one small
all-reduce), so every rank takes the same decision when the loss is NaN or inf:

  --nan-policy stop  raise NonFiniteLoss naming the iteration; nothing is updated.
  --nan-policy skip  drop the update (our AdamW does not step, under any ZeRO stage); the schedule does
                     not advance and the step's record says ``skipped``.

NaN/inf gradients under a finite loss are caught too: ZeRO 1/2 drop such a step themselves (we ask them
to check) and we see it in ``was_step_applied``; under ZeRO 0 we check the gradient norm before the
update. Either way the policy applies, so no update is lost, or applied, silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moc_megatron.errors import UserError
from moc_megatron.training.optim import global_grad_norm, group_lrs


class NonFiniteLoss(UserError):
    """The loss (or the gradient) became NaN or inf under --nan-policy stop."""


@dataclass
class StepResult:
    iteration: int                                  # steps done after this one (1-based)
    loss: float
    lm_loss: float
    load_balance_loss: float | None
    z_loss: float | None
    grad_norm: float | None                         # before clipping; None when the step was skipped
    lrs: dict                                       # group name -> lr used by this step
    skipped: bool = False
    router: list = field(default_factory=list)      # per memory layer: {entropy, usage (c,)} summed (device)


def steps_for(engine, optimizer, scheduler, cfg, ctx):
    """The step/eval interface for this engine: PipelineSteps under pipeline parallelism, else Steps."""
    if ctx.pp_size > 1:
        from moc_megatron.training.pipeline_step import PipelineSteps

        return PipelineSteps(engine, scheduler, cfg, ctx)
    return Steps(engine, optimizer, scheduler, cfg, ctx)


class Steps:
    def __init__(self, engine, optimizer, scheduler, cfg, ctx):
        self.engine, self.optimizer, self.scheduler, self.cfg, self.ctx = engine, optimizer, scheduler, cfg, ctx

    def train(self, batches, iteration: int) -> StepResult:
        """Run the micro-batches of step ``iteration`` (1-based) and update the weights, or skip."""
        engine, optimizer, cfg = self.engine, self.optimizer, self.cfg
        lrs = group_lrs(engine.optimizer)
        batches = list(batches)
        sums, router = None, None
        for i, batch in enumerate(batches):
            out = forward(engine, batch)
            engine.backward(out.loss)
            sums = loss_parts(out) if sums is None else sums + loss_parts(out)
            router = accumulate_router(router, out.router_stats)
            if i == len(batches) - 1:
                totals = reduce_parts(sums, len(batches), self.ctx)
                norm = zero0_grad_norm(engine, optimizer, self.ctx)
                problem = _nonfinite(totals, norm)
                if problem:
                    apply_nan_policy(cfg, iteration, problem)
                    optimizer.drop_step = True
            try:
                engine.step()
            finally:
                optimizer.drop_step = False
        if not problem and not engine.was_step_applied():
            problem = "a gradient is NaN or inf (the loss was finite)"
            apply_nan_policy(cfg, iteration, problem)
        if not problem:
            self.scheduler.step(1)
            norm = norm if norm is not None else _float(engine.get_global_grad_norm())
        return _result(iteration, totals, None if problem else norm, lrs, bool(problem), router, cfg)

    @torch.no_grad()
    def evaluate(self, batches) -> tuple[float, float]:
        """(lm loss, loss) of one global batch: the mean over its micro-batches and the data-parallel ranks."""
        self.engine.eval()
        try:
            parts = [loss_parts(forward(self.engine, batch))[:2] for batch in batches]
        finally:
            self.engine.train()
        loss, lm = reduce_parts(torch.stack(parts).sum(0), len(parts), self.ctx).tolist()
        return lm, loss


def forward(engine, batch):
    out = engine(batch["tokens"], batch["labels"], batch["loss_mask"])
    if torch.is_grad_enabled():
        hook_backward_prologue(engine, out)
    return out


def hook_backward_prologue(engine, out) -> None:
    """DeepSpeed starts its per-backward bookkeeping from hooks on the forward's output tensors (in a
    tuple, list or dict). It finds none in our ModelOutput, so without this BF16_Optimizer (bf16 + ZeRO 1
    with fp32 accumulation) never clears the previous micro-batch's bf16 gradients and adds them again,
    and ZeRO never learns the accumulation boundary. Hook the loss the way the engine would."""
    from deepspeed.runtime.utils import register_output_backward_hooks

    tensors = [v for v in vars(out).values() if isinstance(v, torch.Tensor)]
    if out.loss.grad_fn is not None and not any(hasattr(t, "_backward_hook_managers") for t in tensors):
        register_output_backward_hooks(out.loss, preprocess_once_fn=engine._backward_prologue)


def loss_parts(out) -> torch.Tensor:
    """[loss, lm, load balance, z] of one micro-batch, detached, fp32 (0 where absent)."""
    vals = [out.loss, out.lm_loss, out.load_balance_loss, out.z_loss]
    return torch.stack([torch.zeros((), device=out.loss.device) if v is None else v.detach().float() for v in vals])


def reduce_parts(sums: torch.Tensor, n: int, ctx) -> torch.Tensor:
    """Mean over micro-batches and data-parallel ranks (a NaN anywhere makes it NaN everywhere)."""
    sums = sums.clone()
    if ctx.dp_size > 1:
        dist.all_reduce(sums, group=ctx.dp_group)
    return sums / (n * ctx.dp_size)


def zero0_grad_norm(engine, optimizer, ctx) -> float | None:
    """Global gradient norm under ZeRO 0 (DeepSpeed reports none there); None under ZeRO 1/2. In fp32,
    the norm AdamW's coming step clips by."""
    if engine.zero_optimization_stage() != 0:
        return None
    if optimizer.norm_of_grads is not None:
        return optimizer.grad_norm()
    return global_grad_norm(engine.module.parameters(), ctx, engine.device)


def _nonfinite(totals: torch.Tensor, grad_norm: float | None) -> str | None:
    if not bool(torch.isfinite(totals).all()):
        return f"the loss is {totals[0].item()} (lm loss {totals[1].item()})"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm} (the loss was finite)"
    return None


def apply_nan_policy(cfg, iteration: int, problem: str) -> None:
    """stop: raise; skip: warn (the caller drops the update)."""
    if cfg.training.nan_policy == "stop":
        raise NonFiniteLoss(f"iteration {iteration}: {problem}; stopping without updating (--nan-policy stop). "
                            f"Lower --lr, lengthen --lr-warmup-iters or lower --clip-grad, or resume from the "
                            f"last checkpoint with --nan-policy skip")
    from moc_megatron.training.metrics import warn0

    warn0(f"iteration {iteration}: {problem}; update skipped (--nan-policy skip)")


def accumulate_router(acc: list | None, stats: list[dict]) -> list:
    """Sum per-layer entropy and usage over micro-batches (divided by the count when logged)."""
    if not stats:
        return acc or []
    new = [{"entropy": s["entropy"].detach().float(), "usage": s["usage"].detach().long()} for s in stats]
    if acc is None:
        return new
    return [{k: a[k] + b[k] for k in a} for a, b in zip(acc, new)]


def _float(x) -> float | None:
    return x.item() if isinstance(x, torch.Tensor) else x


def _result(iteration, totals, norm, lrs, skipped, router, cfg) -> StepResult:
    loss, lm, lb, z = totals.tolist()
    aux = cfg.has_memory
    return StepResult(iteration=iteration, loss=loss, lm_loss=lm, load_balance_loss=lb if aux else None,
                      z_loss=z if aux else None, grad_norm=norm, lrs=lrs, skipped=skipped, router=router)
