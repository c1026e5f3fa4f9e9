"""Steps and evaluation on DeepSpeed's PipelineEngine (--pipeline-model-parallel-size > 1).

The engine runs the micro-batches of a step itself (train_batch), so this mirrors training/step.py:
micro-batches become ((tokens, valid), (labels, loss_mask)) pairs, router losses ride on the
activations (model/pipeline.py) and are summed over stages for the log. A NaN/inf loss is seen only
after the engine's update: --nan-policy stop raises naming the iteration, skip warns.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moc_megatron.model.pipeline import AttachAuxLoss
from moc_megatron.training.optim import group_lrs
from moc_megatron.training.step import StepResult, apply_nan_policy


def pipe_batches(batches):
    """Training micro-batches in the engine's (inputs, labels) form."""
    for b in batches:
        tokens = b["tokens"]
        yield (tokens, torch.ones_like(tokens, dtype=torch.bool)), (b["labels"], b["loss_mask"])


def train_step_pipeline(engine, scheduler, batches, iteration: int, cfg, ctx) -> StepResult:
    batches = list(batches)
    AttachAuxLoss.scale = 1.0 / len(batches)  # the engine divides the main loss by the same count
    lrs = group_lrs(engine.optimizer)
    lm = engine.train_batch(iter(list(pipe_batches(batches)))).item()
    lb, z = aux_means(engine.module, ctx)
    mem = cfg.memory
    loss = lm + (mem.load_balance_coeff * lb + mem.z_loss_coeff * z if cfg.has_memory else 0.0)
    skipped = False
    if not math.isfinite(loss):
        apply_nan_policy(cfg, iteration, f"the loss is {loss} (lm loss {lm}); the pipeline engine has already "
                                         "applied this update")
        skipped = True
    scheduler.step(1)
    norm = engine.get_global_grad_norm()
    norm = norm.item() if isinstance(norm, torch.Tensor) else norm
    has = cfg.has_memory
    return StepResult(iteration=iteration, loss=loss, lm_loss=lm, load_balance_loss=lb if has else None,
                      z_loss=z if has else None, grad_norm=norm, lrs=lrs, skipped=skipped)


def aux_means(module, ctx) -> tuple[float, float]:
    """Load-balance and z-loss averaged over memory layers and micro-batches, from every stage."""
    values = module.pop_aux_values()
    stats = torch.tensor([sum(v["load_balance_loss"].item() for v in values),
                          sum(v["z_loss"].item() for v in values), float(len(values))], dtype=torch.float64)
    if ctx.pp_size > 1:
        dist.all_reduce(stats, group=ctx.pp_group)
    n = max(stats[2].item(), 1.0)
    return stats[0].item() / n, stats[1].item() / n


@torch.no_grad()
def eval_lm_loss_pipeline(engine, batches) -> float:
    loss = engine.eval_batch(iter(list(pipe_batches(batches))))
    engine.module.pop_aux_values()
    return loss.item() if isinstance(loss, torch.Tensor) else float(loss)
