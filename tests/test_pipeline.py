"""Pipeline parallel on DeepSpeed's PipelineEngine reproduces one process step for step.

Runs 3 optimizer steps (SGD with momentum) with gradient accumulation over micro-batches, on PP=2,
TP=2 x PP=2 and PP=2 x EP=2, and compares the per-step LM loss with a single process that runs the same
micro-batches through MoCModel and steps the same optimizer. Through the trainer: a PP=2 run evaluates
(on the engine's eval_batch) to the validation loss of the same run in one process, and ZeRO-1 with
stages holding different optimizer groups is refused instead of hanging.
"""

import pytest
import torch

from multiproc import run_ranks
from test_parallel_model import perturb_zero_inits, tiny_cfg

from moc_megatron.model.gpt import MoCModel

STEPS, MICRO, GLOBAL, SEQ = 3, 1, 4, 16
MEMORY = {"aux_loss_dp_average": False}  # per-micro-batch statistics, as the reference computes them


def step_batches(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 128, (GLOBAL, SEQ + 1), generator=g)


def micro_batches(step, dp_size, dp_rank):
    """This DP rank's micro-batches of a step: its contiguous slice of the global batch."""
    mine = step_batches(step).chunk(dp_size)[dp_rank]
    return list(mine.split(MICRO))


def optimizer(params):
    """SGD with momentum: its update is linear in the gradient, so a wrong gradient scale shows
    (Adam's normalised update would hide one)."""
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def run_pipeline(rank, world_size, pp, tp, ep):
    import deepspeed

    from moc_megatron.model.pipeline import AttachAuxLoss, MoCPipeline
    from moc_megatron.parallel.deepspeed_moe import mark_chapter_parallel
    from moc_megatron.parallel.state import initialize

    cfg = tiny_cfg(tp, ep, **MEMORY)
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.validate(world_size)
    ctx = initialize(cfg.parallel)
    module = MoCPipeline(cfg, ctx)
    mark_chapter_parallel(module, ctx)
    for layer in module.forward_funcs:  # the same W_O as the reference, in this stage's layers
        if getattr(layer, "memory", None) is not None:
            perturb_zero_inits(_Wrap(layer), ctx)
    ga = GLOBAL // (MICRO * ctx.dp_size)
    ds_config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ga,
                 "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
                 "gradient_clipping": 0.0}  # DeepSpeed's default is 1.0
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer(module.parameters()),
                                           config=ds_config)
    AttachAuxLoss.scale = 1.0 / ga
    losses = []
    for step in range(STEPS):
        batches = micro_batches(step, ctx.dp_size, ctx.dp_rank)
        it = iter([((b[:, :-1], torch.ones_like(b[:, :-1], dtype=torch.bool)), (b[:, 1:], torch.ones(b[:, 1:].shape)))
                   for b in batches])
        losses.append(engine.train_batch(it).item())
    return losses


class _Wrap:
    """perturb_zero_inits walks model.layers; give it one pipeline layer."""

    def __init__(self, layer):
        self.layers = [None] * layer.layer_idx + [layer]


def reference_losses(ctx, dp_size):
    model = MoCModel(tiny_cfg(**MEMORY).validate(), ctx)
    perturb_zero_inits(model, ctx)
    opt = optimizer(model.parameters())
    losses = []
    for step in range(STEPS):
        micro = [b for r in range(dp_size) for b in micro_batches(step, dp_size, r)]
        opt.zero_grad()
        lm = 0.0
        for b in micro:
            out = model(b[:, :-1], b[:, 1:])
            (out.loss / len(micro)).backward()
            lm += out.lm_loss.item() / len(micro)
        opt.step()
        losses.append(lm)
    return losses


LAYOUTS = {"pp2": (2, 2, 1, 1), "tp2_pp2": (4, 2, 2, 1), "pp2_ep2": (4, 2, 1, 2)}  # world, pp, tp, ep


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_matches_single_process_losses(ctx, layout):
    world, pp, tp, ep = LAYOUTS[layout]
    dp = world // (pp * tp)
    ref = reference_losses(ctx, dp)
    got = run_ranks(run_pipeline, world, args=(pp, tp, ep), timeout=600)
    last_stage = got[-1]
    for step, (a, b) in enumerate(zip(last_stage, ref)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{layout} step {step}: {a} vs {b}"
    assert abs(ref[1] - ref[0]) > 1e-3, "the optimizer must have changed the weights"


# ---------------------------------------------------------------------------------------------
# Through the trainer: evaluation, and ZeRO-1 over unequal stages


def trainer_cfg(pp: int, zero_stage: int):
    """moc-tiny cut to 2 layers, memory at layer 1 only (so one stage has no memory layer), evaluating
    2 global batches after every step."""
    from test_train import tiny

    cfg = tiny(train_iters=2, eval_interval=1, eval_iters=2, zero_stage=zero_stage, lr=1e-4, min_lr=1e-4)
    cfg.parallel.pipeline_model_parallel_size = pp
    return cfg


def _train_evals(rank, world_size, cfg):
    from moc_megatron.training.trainer import train

    run = train(cfg)
    return run.evals, [r.loss for r in run.history]


@pytest.mark.slow
def test_pipeline_run_evaluates_to_the_single_process_validation_loss():
    one = run_ranks(_train_evals, 1, (trainer_cfg(1, 0),), timeout=300)[0]
    two = run_ranks(_train_evals, 2, (trainer_cfg(2, 0),), timeout=300)
    assert two[0] == two[1], "stages disagree on the logged losses"
    evals, losses = two[0]
    assert [e["iteration"] for e in evals] == [e["iteration"] for e in one[0]] == [1, 2]
    for got, want in zip(evals, one[0]):
        for key in ("eval_lm_loss", "eval_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["iteration"], key)
    assert losses == pytest.approx(one[1], rel=1e-5)
    assert evals[1]["eval_lm_loss"] != evals[0]["eval_lm_loss"], "the step between the evaluations changed nothing"


def _build_error(rank, world_size, cfg):
    from moc_megatron.errors import UserError
    from moc_megatron.training.trainer import build

    try:
        build(cfg)
    except UserError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_zero1_pipeline_with_a_stage_without_memory_is_refused_not_hung():
    messages = run_ranks(_build_error, 2, (trainer_cfg(2, 1),), timeout=300)
    assert messages[0] == messages[1] and messages[0] is not None
    assert "different optimizer groups" in messages[0] and "--zero-stage 0" in messages[0]
