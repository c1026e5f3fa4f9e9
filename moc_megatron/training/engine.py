"""The DeepSpeed engine: its JSON config (from --deepspeed-config, flags filling what it leaves out),
ZeRO 0/1/2, gradient accumulation, clipping and bf16, around our AdamW over the three parameter groups.

Under bf16 with ZeRO 1/2, gradients are accumulated in fp32 (``data_types.grad_accum_dtype``): the bank's
gradient is a sum over every memory layer that reads it and every micro-batch. DeepSpeed 0.19.8 has no
fp32 accumulation under ZeRO 0 (it keeps fp32 master weights there, but bf16 gradients)."""

from __future__ import annotations

import json
import logging
import os
import warnings

import torch
import torch.distributed as dist

from moc_megatron.config import Config
from moc_megatron.errors import UserError
from moc_megatron.parallel.state import ParallelContext, cpu_deepspeed
from moc_megatron.training.optim import build_optimizer, build_scheduler, global_grad_norm, optimizer_groups

NEVER = 10**12  # DeepSpeed's own periodic printing is replaced by ours


def read_deepspeed_json(path: str) -> dict:
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--deepspeed-config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--deepspeed-config {path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise UserError(f"--deepspeed-config {path}: expected a JSON object")
    for key, why in (("scheduler", "the schedule comes from --lr-decay-style and friends"),
                     ("optimizer", "the optimizer is AdamW over the three parameter groups (--lr, "
                                   "--memory-layer-lr, --memory-bank-lr, --adam-beta1/2, --adam-eps)"),
                     ("fp16", "fp16 is not supported; use --bf16")):
        if key in ds and (key != "fp16" or ds[key].get("enabled") is True):
            raise UserError(f"--deepspeed-config {path}: remove '{key}': {why}")
    return ds


def adopt_deepspeed_json(cfg: Config, world_size: int) -> dict:
    """Merge --deepspeed-config into cfg (the JSON wins where it speaks), before validation.

    Afterwards cfg alone says the batch sizes, ZeRO stage, clipping and precision."""
    t, p = cfg.training, cfg.parallel
    ds = read_deepspeed_json(t.deepspeed_config) if t.deepspeed_config else {}
    dp = max(world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size), 1)
    given = {k: v for k, v in ds.items() if v != "auto"}
    t.micro_batch_size = given.get("train_micro_batch_size_per_gpu", t.micro_batch_size)
    if "train_batch_size" in given:
        t.global_batch_size = given["train_batch_size"]
    elif "gradient_accumulation_steps" in given:
        t.global_batch_size = t.micro_batch_size * dp * given["gradient_accumulation_steps"]
    t.clip_grad = given.get("gradient_clipping", t.clip_grad)
    t.zero_stage = _given(ds.get("zero_optimization", {}), "stage", t.zero_stage)
    t.bf16 = bool(_given(ds.get("bf16", {}), "enabled", t.bf16))
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    return ds


def _given(section: dict, key: str, default):
    value = section.get(key, "auto")
    return default if value == "auto" else value


def deepspeed_config(cfg: Config, ctx: ParallelContext, ds: dict) -> dict:
    """The full JSON handed to deepspeed.initialize: ``ds`` with every key the flags decide filled in."""
    t = cfg.training
    out = json.loads(json.dumps(ds))
    out["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    out["train_batch_size"] = t.global_batch_size
    out["gradient_accumulation_steps"] = accumulation_steps(cfg, ctx)
    out["gradient_clipping"] = 0.0 if clips_itself(cfg) else t.clip_grad
    out.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    bf16 = t.bf16 and bf16_supported()
    out["bf16"] = {**out.get("bf16", {}), "enabled": bf16}
    accum = out.get("data_types", {}).get("grad_accum_dtype")
    if bf16 and t.zero_stage == 0 and accum not in (None, "bf16"):
        raise UserError(f"--deepspeed-config {t.deepspeed_config}: data_types.grad_accum_dtype {accum} with bf16 needs "
                        "--zero-stage 1 or 2 (DeepSpeed 0.19.8 supports it there only)")
    if bf16 and t.zero_stage > 0:
        out.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    out["zero_allow_untested_optimizer"] = True  # our AdamW is torch's, with a skippable step
    out.setdefault("steps_per_print", NEVER)
    out.setdefault("wall_clock_breakdown", False)
    return out


def clips_itself(cfg: Config) -> bool:
    """ZeRO 0 in fp32: our AdamW clips by the true global norm (optim.AdamW), DeepSpeed not at all."""
    return cfg.training.zero_stage == 0 and not (cfg.training.bf16 and bf16_supported())


def accumulation_steps(cfg: Config, ctx: ParallelContext) -> int:
    t = cfg.training
    return t.global_batch_size // (t.micro_batch_size * ctx.dp_size)


def bf16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_bf16_supported()


def build_engine(model: torch.nn.Module, cfg: Config, ctx: ParallelContext, ds: dict):
    """(engine, our AdamW inside it, scheduler)."""
    import deepspeed

    from moc_megatron.training.metrics import warn0

    if cfg.training.bf16 and not bf16_supported():
        warn0("--bf16: this device has no bf16; training in fp32")
    elif cfg.training.bf16 and cfg.training.zero_stage == 0:
        warn0("--bf16 --zero-stage 0: DeepSpeed accumulates gradients in bf16 under ZeRO 0 (fp32 needs ZeRO 1 or 2, "
              "which cost nothing extra at one data-parallel rank)")
    if torch.cuda.is_available():  # the engine would move it too; on the GPU first, AdamW can be fused
        model.to(torch.device("cuda", torch.cuda.current_device()))
    groups = optimizer_groups(model, cfg, ctx.ep_size)
    optimizer = build_optimizer(groups, cfg)
    pipeline = isinstance(model, deepspeed.PipelineModule)  # it brings its own grid as the mpu
    mpu = TensorParallelUnit(ctx) if ctx.tp_size > 1 and not pipeline else None
    # DeepSpeed's fp16/bf16 wrapper (bf16 under ZeRO 0) steps the optimizer once on zero gradients to make
    # its state: Adam would count a step (its bias correction shrinks every later update) and decay the weights
    optimizer.drop_step = True
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, ctx, ds),
                                               mpu=mpu, dist_init_required=False)
    finally:
        optimizer.drop_step = False
    if clips_itself(cfg):
        optimizer.norm_of_grads = lambda: global_grad_norm(engine.module.parameters(), ctx, engine.device)
        optimizer.clip_grad = cfg.training.clip_grad
    if hasattr(engine.optimizer, "check_grad_overflow"):
        # ZeRO 1/2 drop a step with NaN/inf gradients only when asked (fp32: only when clipping)
        engine.optimizer.check_grad_overflow = True
    if pipeline:
        check_stage_groups(engine, cfg, ctx)
    return engine, optimizer, build_scheduler(engine.optimizer, cfg)


def check_stage_groups(engine, cfg: Config, ctx: ParallelContext) -> None:
    """DeepSpeed's ZeRO optimizer reduces the gradient norm over the stages once per optimizer group, so
    stages holding different groups (one without a memory layer has no memory or bank group) would hang
    at the first step. Refuse that on every rank. (BF16_Optimizer, bf16 under ZeRO 1, reduces one norm.)"""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        return
    mine = [f"{g['group']}{'' if g['decay'] else '.no_decay'}{' (chapter shards)' if g.get('moe') else ''}"
            for g in engine.optimizer.param_groups]
    stages = [None] * ctx.pp_size
    dist.all_gather_object(stages, mine, group=ctx.pp_group)
    if any(s != mine for s in stages):
        shown = "; ".join(f"stage {i}: {', '.join(s)}" for i, s in enumerate(stages))
        raise UserError(f"--pipeline-model-parallel-size {ctx.pp_size} --zero-stage {cfg.training.zero_stage}: the "
                        f"stages hold different optimizer groups ({shown}), and DeepSpeed's ZeRO optimizer would hang "
                        f"reducing their gradient norms. Put a memory layer on every stage (--memory-layers) or use "
                        f"--zero-stage 0")


class TensorParallelUnit:
    """The process groups DeepSpeed asks of a model-parallel unit ("mpu"): gradients are averaged over
    the data-parallel group, norms summed over the tensor-parallel group (parameters that megatron-core
    marks ``tensor_model_parallel`` are shards; the others are counted once)."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx

    def get_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size

    def get_model_parallel_group(self):
        return self.ctx.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp_size

    def get_data_parallel_group(self):
        return self.ctx.dp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def prepare_deepspeed() -> None:
    """Before anything touches deepspeed.comm: the CPU accelerator without its comm op (see
    parallel.state.cpu_deepspeed), and DeepSpeed's log kept quiet."""
    from deepspeed.utils import logger

    cpu_deepspeed()
    logger.setLevel(logging.WARNING)
    logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())  # ours: AdamW + drop_step
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)
