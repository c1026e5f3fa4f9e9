"""Steps and evaluation on DeepSpeed's PipelineEngine (--pipeline-model-parallel-size > 1).

The same interface as training/step.py's Steps. The engine runs the micro-batches of a step itself
(train_batch, eval_batch; calling the engine directly is refused in pipeline mode), so micro-batches
become ((tokens, valid), (labels, loss_mask)) pairs, and router losses ride on the activations
(model/pipeline.py) and are averaged over stages and data-parallel ranks for the log. A NaN/inf loss is
seen only after the engine's update: --nan-policy stop raises naming the iteration, skip warns.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moc_megatron.model.pipeline import AttachAuxLoss
from moc_megatron.training.optim import group_lrs
from moc_megatron.training.step import StepResult, apply_nan_policy


def pipe_batches(batches):
    """Micro-batches in the engine's (inputs, labels) form."""
    for b in batches:
        tokens = b["tokens"]
        yield (tokens, torch.ones_like(tokens, dtype=torch.bool)), (b["labels"], b["loss_mask"])


class PipelineSteps:
    def __init__(self, engine, scheduler, cfg, ctx):
        self.engine, self.scheduler, self.cfg, self.ctx = engine, scheduler, cfg, ctx

    def train(self, batches, iteration: int) -> StepResult:
        engine, cfg = self.engine, self.cfg
        batches = list(batches)
        AttachAuxLoss.scale = 1.0 / len(batches)  # the engine divides the main loss by the same count
        lrs = group_lrs(engine.optimizer)
        lm = engine.train_batch(iter(list(pipe_batches(batches)))).item()
        lb, z = aux_means(engine, self.ctx)
        loss = self._total(lm, lb, z)
        skipped = False
        if not math.isfinite(loss):
            apply_nan_policy(cfg, iteration, f"the loss is {loss} (lm loss {lm}); the pipeline engine has already "
                                             "applied this update")
            skipped = True
        self.scheduler.step(1)
        norm = engine.get_global_grad_norm()  # None under ZeRO 0, where our AdamW clipped by its own
        norm = getattr(engine.optimizer, "last_grad_norm", None) if norm is None else norm
        norm = norm.item() if isinstance(norm, torch.Tensor) else norm
        has = cfg.has_memory
        return StepResult(iteration=iteration, loss=loss, lm_loss=lm, load_balance_loss=lb if has else None,
                          z_loss=z if has else None, grad_norm=norm, lrs=lrs, skipped=skipped)

    @torch.no_grad()
    def evaluate(self, batches) -> tuple[float, float]:
        """(lm loss, loss) of one global batch, as Steps.evaluate: eval_batch averages the lm loss over the
        micro-batches and data-parallel ranks and hands it to every stage."""
        lm = self.engine.eval_batch(iter(list(pipe_batches(batches))))
        lm = lm.item() if isinstance(lm, torch.Tensor) else float(lm)
        lb, z = aux_means(self.engine, self.ctx)
        return lm, self._total(lm, lb, z)

    def _total(self, lm: float, lb: float, z: float) -> float:
        mem = self.cfg.memory
        return lm + (mem.load_balance_coeff * lb + mem.z_loss_coeff * z if self.cfg.has_memory else 0.0)


def aux_means(engine, ctx) -> tuple[float, float]:
    """Load-balance and z-loss since the last call, averaged over memory layers, micro-batches, stages and
    data-parallel ranks (as the single-process step averages them). On the engine's device: NCCL reduces
    no CPU tensor."""
    values = engine.module.pop_aux_values()
    stats = torch.zeros(3, dtype=torch.float64, device=engine.device)
    if values:
        stats += torch.stack([torch.stack([v["load_balance_loss"] for v in values]).sum().double(),
                              torch.stack([v["z_loss"] for v in values]).sum().double(),
                              torch.tensor(float(len(values)), dtype=torch.float64, device=stats.device)])
    for group, size in ((ctx.pp_group, ctx.pp_size), (ctx.dp_group, ctx.dp_size)):
        if size > 1:
            dist.all_reduce(stats, group=group)
    lb, z, n = stats.tolist()
    return lb / max(n, 1.0), z / max(n, 1.0)
