"""A training run: build, resume, then steps with logging, evaluation and checkpoints.

    run = train(cfg)         # run.history: one StepResult per step (floats); run.evals: one dict per evaluation
                             # run.exit_reason: why it stopped before --train-iters (exit.py), else None
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist

from moc_megatron.config import Config
from moc_megatron.errors import UserError
from moc_megatron.model.gpt import MoCModel, parameter_groups
from moc_megatron.model.pipeline import MoCPipeline
from moc_megatron.ops import backend as ops_backend
from moc_megatron.parallel.deepspeed_moe import mark_chapter_parallel
from moc_megatron.parallel.state import ParallelContext, bind_local_device, init_distributed, initialize
from moc_megatron.training import checkpoint
from moc_megatron.training.bank_optim import BankOptimizer
from moc_megatron.training.data import build_datasets, micro_batches, step_indices
from moc_megatron.training.engine import accumulation_steps, adopt_deepspeed_json, build_engine, prepare_deepspeed
from moc_megatron.training.exit import Exits
from moc_megatron.training.metrics import Reporter, Throughput, print0, router_summary, step_record, warn0
from moc_megatron.training.resume import first_start, load
from moc_megatron.training.step import StepResult, steps_for


@dataclass
class Run:
    cfg: Config
    ctx: ParallelContext
    engine: object
    optimizer: object
    scheduler: object
    steps: object                       # training/step.py's Steps or PipelineSteps: train() and evaluate()
    train_data: object
    valid_data: object
    iteration: int = 0                  # steps done
    consumed: int = 0                   # training samples read (the data position)
    start_iteration: int = 0
    history: list = field(default_factory=list)   # StepResults without the router tensors
    evals: list = field(default_factory=list)
    skipped_steps: int = 0
    reporter: Reporter | None = None
    throughput: Throughput | None = None
    saved_at: int = -1
    comm_bytes: tuple = (0, 0)          # chapter all-to-all bytes (sent, received) of the last step
    bank_optimizer: object = None       # --memory-bank-optimizer sparse_adam
    exits: Exits | None = None          # --exit-interval, --exit-duration-in-mins, --exit-signal-handler
    exit_reason: str | None = None      # why the run stopped before --train-iters


def train(cfg: Config) -> Run:
    started = time.monotonic()  # --exit-duration-in-mins counts from here: this process's start of training
    run = build(cfg, started)
    try:
        loop(run)
    finally:
        run.exits.close()
        run.reporter.close()
    return run


def build(cfg: Config, started: float | None = None) -> Run:
    ctx, ds = setup(cfg)
    exits = Exits(cfg, started)  # the signal handler covers the model build, DeepSpeed's start and --load
    try:
        run = assemble(cfg, ctx, ds)
    except BaseException:
        exits.close()
        raise
    run.exits = exits
    return run


def assemble(cfg: Config, ctx: ParallelContext, ds: dict) -> Run:
    model = build_model(cfg, ctx)
    engine, optimizer, scheduler, bank_optimizer = wrap(model, cfg, ctx, ds)
    train_data, valid_data = build_datasets(cfg)
    if cfg.training.eval_interval and valid_data is None:
        warn0(f"--split {cfg.training.split} leaves no validation data: no evaluation")
    steps = steps_for(engine, optimizer, scheduler, cfg, ctx)
    run = Run(cfg, ctx, engine, optimizer, scheduler, steps, train_data, valid_data, bank_optimizer=bank_optimizer)
    if cfg.training.load and first_start(cfg):
        print0(f"--load {cfg.training.load}: no checkpoint there yet (it is also --save): starting at iteration 0")
    elif cfg.training.load:
        run.iteration, run.consumed = load(engine, scheduler, cfg, ctx)
        run.start_iteration = run.saved_at = run.iteration
    run.reporter = Reporter(cfg)
    run.throughput = Throughput(cfg, dist.get_world_size(), run.iteration)
    describe(run, model)
    return run


def setup(cfg: Config) -> tuple[ParallelContext, dict]:
    """Join the world, settle and validate the config for it, build the parallel groups, seed.
    Returns the parallel context and the DeepSpeed JSON config."""
    prepare_deepspeed()
    cuda_settings(cfg)
    bind_local_device()  # before NCCL starts: one GPU per local rank
    init_distributed()
    ds = adopt_deepspeed_json(cfg, dist.get_world_size())
    cfg.validate(dist.get_world_size())
    check_supported(cfg)
    ctx = initialize(cfg.parallel)
    seed_everything(cfg.training.seed)
    return ctx, ds


def cuda_settings(cfg: Config) -> None:
    """TF32 matmuls on GPUs; under TP, one hardware queue so that megatron-core's TP communication is
    ordered before the compute that waits for it (read when the CUDA context starts)."""
    if cfg.parallel.tensor_model_parallel_size > 1 and "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warn0("CUDA started before CUDA_DEVICE_MAX_CONNECTIONS=1 could be set; set it in the environment "
                  "(launch_scripts/_common.sh does) for tensor parallelism")
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def wrap(model, cfg: Config, ctx: ParallelContext, ds: dict):
    """(engine, optimizer, scheduler, bank optimizer or None) around the built model."""
    engine, optimizer, scheduler = build_engine(model, cfg, ctx, ds)
    bank_optimizer = BankOptimizer(model, cfg, ctx) if cfg.training.memory_bank_optimizer == "sparse_adam" else None
    engine.moc_bank_optimizer = bank_optimizer  # checkpoint.save / resume.load find it here
    return engine, optimizer, scheduler, bank_optimizer


def build_model(cfg: Config, ctx: ParallelContext):
    """MoCModel, or this rank's pipeline stage; chapter shards marked as DeepSpeed expert parameters
    (a frozen bank has no gradient to reduce, and ZeRO refuses expert marks without expert groups)."""
    model = MoCPipeline(cfg, ctx) if ctx.pp_size > 1 else MoCModel(cfg, ctx)
    if bank_in_deepspeed(cfg):
        mark_chapter_parallel(model, ctx)
    return model


def bank_in_deepspeed(cfg: Config) -> bool:
    """Whether DeepSpeed's optimizer trains the bank (not when frozen or row-sparse)."""
    return cfg.has_memory and not cfg.training.freeze_memory_bank and cfg.training.memory_bank_optimizer == "adamw"


def check_supported(cfg: Config) -> None:
    t = cfg.training
    if t.memory_bank_optimizer == "sparse_adam":
        if cfg.parallel.pipeline_model_parallel_size > 1:
            raise UserError("--memory-bank-optimizer sparse_adam: not with --pipeline-model-parallel-size > 1 "
                            "(DeepSpeed's tied-weight reduction needs dense gradients)")
        if t.zero_stage == 0:
            raise UserError("--memory-bank-optimizer sparse_adam needs --zero-stage 1 or 2 (ZeRO leaves the "
                            "bank's sparse gradients to the bank optimizer)")
        if t.freeze_memory_bank or not cfg.has_memory:
            raise UserError("--memory-bank-optimizer sparse_adam: the model has no trainable bank")
    if t.finetune and not t.load:
        raise UserError("--finetune needs --load (the pretrained checkpoint)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loop(run: Run) -> None:
    t = run.cfg.training
    while run.iteration < t.train_iters and run.exit_reason is None:
        res = one_step(run)
        if res.iteration % t.log_interval == 0 or res.iteration == t.train_iters:
            log_step(run, res)
        if run.valid_data is not None and t.eval_interval and (res.iteration % t.eval_interval == 0
                                                               or res.iteration == t.train_iters):
            evaluate(run)
        if t.save and t.save_interval and res.iteration % t.save_interval == 0:
            save(run)
        if res.iteration < t.train_iters:
            run.exit_reason = run.exits.check(res.iteration, run.engine.device)
    if t.save and run.saved_at != run.iteration:
        save(run)
    dist.barrier()  # no rank leaves while another still talks to it
    if run.exit_reason is not None:
        saved = f"checkpoint {checkpoint.tag_of(run.iteration)} in {t.save}" if t.save else "nothing saved (no --save)"
        print0(f"stopped at iteration {run.iteration} of {t.train_iters}: {run.exit_reason}; {saved}; "
               f"{run.skipped_steps} skipped; resume with --load")
    else:
        print0(f"done: {run.iteration} iterations, {run.skipped_steps} skipped")


def one_step(run: Run) -> StepResult:
    cfg, ctx = run.cfg, run.ctx
    indices = step_indices(run.consumed, cfg, ctx)
    batches = micro_batches(run.train_data, indices, run.engine.device)
    res = run.steps.train(batches, run.iteration + 1)
    run.iteration = res.iteration
    run.comm_bytes = take_comm_bytes(run.engine.module)
    if run.bank_optimizer is not None:
        run.bank_optimizer.step(res.lrs["backbone"], res.skipped)
    run.consumed += cfg.training.global_batch_size
    run.skipped_steps += res.skipped
    run.history.append(replace(res, router=[]))  # the router's device tensors are for log_step only
    return res


def log_step(run: Run, res: StepResult) -> None:
    accum = accumulation_steps(run.cfg, run.ctx)
    router = router_summary(res.router, accum, run.cfg, run.ctx.dp_group)
    rec = step_record(res, run.throughput.interval(res.iteration), run.skipped_steps)
    if run.ctx.ep_size > 1:  # every rank's chapter all-to-all traffic in the step
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, run.comm_bytes)
        rec["chapter_bytes_sent"] = [sent for sent, _ in per_rank]
        rec["chapter_bytes_received"] = [received for _, received in per_rank]
    run.reporter.log_step(rec, router)


def take_comm_bytes(module) -> tuple[int, int]:
    """Bytes this rank's chapter-parallel reads sent and received since the last call; resets them."""
    sent = received = 0
    for m in module.modules():
        read = getattr(m, "chapter_parallel", None)
        if read is not None:
            sent, received = sent + read.bytes_sent, received + read.bytes_received
            read.bytes_sent = read.bytes_received = 0
    return sent, received


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Mean lm loss (and total loss) over --eval-iters global batches of the validation split."""
    started = time.perf_counter()
    cfg, ctx = run.cfg, run.ctx
    lm = loss = 0.0
    for k in range(cfg.training.eval_iters):
        indices = step_indices(k * cfg.training.global_batch_size, cfg, ctx)
        lm_k, loss_k = run.steps.evaluate(list(micro_batches(run.valid_data, indices, run.engine.device)))
        lm, loss = lm + lm_k / cfg.training.eval_iters, loss + loss_k / cfg.training.eval_iters
    take_comm_bytes(run.engine.module)  # evaluation's all-to-all traffic is not the next step's
    rec = {"iteration": run.iteration, "eval_lm_loss": lm, "eval_loss": loss, "eval_ppl": float(np.exp(min(lm, 50)))}
    run.evals.append(rec)
    run.reporter.log_eval(rec)
    run.throughput.exclude(time.perf_counter() - started)
    return rec


def save(run: Run) -> None:
    started = time.perf_counter()
    path = checkpoint.save(run.engine, run.scheduler, run.cfg, run.ctx, run.iteration, run.consumed)
    run.saved_at = run.iteration
    print0(f"saved {path} ({time.perf_counter() - started:.1f}s)")
    run.throughput.exclude(time.perf_counter() - started)


def describe(run: Run, model: MoCModel) -> None:
    cfg, ctx = run.cfg, run.ctx
    t = cfg.training
    counts = {g: sum(p.numel() for _, p in ps) for g, ps in parameter_groups(model).items()}
    params = ", ".join(f"{g} {n / 1e6:.2f}M" for g, n in counts.items() if n)
    print0(f"model: {sum(counts.values()) / 1e6:.2f}M parameters ({params})"
           f"{'; bank frozen' if t.freeze_memory_bank else ''}")
    print0(f"world {dist.get_world_size()} = dp {ctx.dp_size} x tp {ctx.tp_size} x pp {ctx.pp_size} "
           f"(chapter parallel {ctx.ep_size} within dp); ZeRO {t.zero_stage}; "
           f"global batch {t.global_batch_size} = micro {t.micro_batch_size} x accumulation "
           f"{accumulation_steps(cfg, ctx)} x dp {ctx.dp_size}; {t.global_batch_size * t.seq_length:,} tokens/step; "
           f"{'bf16' if run.engine.bfloat16_enabled() else 'fp32'} on {run.engine.device}; "
           f"chapter ops: {ops_backend()}")
    if run.iteration:
        print0(f"resumed from {t.load} at iteration {run.iteration}")
