"""The trainer on one process: optimizer groups and schedules, per-group learning rates, the frozen bank,
the NaN policy, the assistant-only loss, the entry point and its logs.

Runs that build a DeepSpeed engine go through run_ranks (a fresh gloo process each), so they never
disturb the single-process groups of the rest of the suite. ``tiny()`` is shared with the other
test_train_*.py files.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from moc_megatron.config import load_config
from multiproc import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/models/moc-tiny.yaml")


def tiny(memory: dict | None = None, **training):
    """moc-tiny cut to 2 layers (memory at 1), seq 32, 2 x 2 sequences per step, mock data, fp32."""
    t = dict(seq_length=32, micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-3, min_lr=1e-4,
             lr_decay_style="constant", mock_data=True, log_interval=1, eval_interval=0, zero_stage=1)
    t.update(training)
    return load_config(TINY, model=dict(num_layers=2), memory=dict(layers=[1], **(memory or {})), training=t)


def params_of(module) -> dict:
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}


def optimizer_tensors(engine) -> list:
    """Every tensor of the base optimizer's state (Adam moments, step counts), in group order."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = []
    for group in base.param_groups:
        for p in group["params"]:
            out += [v.detach().cpu().clone() for _, v in sorted(base.state.get(p, {}).items())
                    if isinstance(v, torch.Tensor)]
    return out


def train_with_snapshot(cfg, nan_at: int | None = None, prepare=None):
    """Train; return (initial params, final params, run). ``nan_at``: the loss of that iteration's first
    micro-batch is replaced by NaN; ``prepare(model)`` runs before the engine is built."""
    import moc_megatron.training.trainer as trainer
    from moc_megatron.model.gpt import MoCModel

    initial = {}
    build_engine = trainer.build_engine

    def snapshot_then_build(model, *args):
        if prepare is not None:
            prepare(model)
        initial.update(params_of(model))
        return build_engine(model, *args)

    forward = MoCModel.forward
    trainer.build_engine = snapshot_then_build
    if nan_at is not None:
        accumulation = cfg.training.global_batch_size // cfg.training.micro_batch_size
        MoCModel.forward = _nan_forward(forward, nan_at, accumulation)
    try:
        run = trainer.train(cfg)
    finally:
        trainer.build_engine, MoCModel.forward = build_engine, forward
    return initial, params_of(run.engine.module), run


def _nan_forward(forward, iteration: int, accumulation: int):
    calls = [0]

    def nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == (iteration - 1) * accumulation + 1:
                out.loss = out.loss * float("nan")
        return out

    return nan_forward


# ---------------------------------------------------------------------------------------------
# Optimizer groups and schedules (no engine)


def test_optimizer_groups_have_own_peaks_and_no_decay_on_norms_and_biases(ctx):
    from moc_megatron.model.gpt import MoCModel
    from moc_megatron.training.optim import optimizer_groups

    cfg = tiny(lr=1e-3, min_lr=1e-4, memory_layer_lr=3e-3, memory_bank_lr=2e-3)
    model = MoCModel(cfg, ctx)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in optimizer_groups(model, cfg)}
    assert set(groups) == {"backbone", "backbone.no_decay", "memory_layers", "memory_layers.no_decay", "bank"}
    for name, g in groups.items():
        peak = {"backbone": 1e-3, "memory_layers": 3e-3, "bank": 2e-3}[name.split(".")[0]]
        assert g["max_lr"] == peak and g["min_lr"] == pytest.approx(peak * 0.1)
        assert g["wd_mult"] == (0.0 if name.endswith("no_decay") else 1.0)
        for p in g["params"]:
            is_norm_or_bias = "norm" in names[id(p)] or names[id(p)].endswith(".bias")
            assert is_norm_or_bias == name.endswith("no_decay"), names[id(p)]
    assert any(names[id(p)] == "layers.1.memory.router.proj.bias" for p in groups["memory_layers.no_decay"]["params"])
    covered = sum(len(g["params"]) for g in groups.values())
    assert covered == len(list(model.parameters()))


def test_frozen_bank_is_left_out_of_the_optimizer(ctx):
    from moc_megatron.model.gpt import MoCModel
    from moc_megatron.training.optim import optimizer_groups

    model = MoCModel(tiny(freeze_memory_bank=True), ctx)
    groups = optimizer_groups(model, tiny(freeze_memory_bank=True))
    assert not any(g["name"].startswith("bank") for g in groups)
    assert not any(p.requires_grad for p in model.banks.parameters())


def _reference_lr(step, peak, ratio, warmup, decay_iters, style, wsd_iters=None):
    """Megatron's schedules written out independently (step = optimizer steps taken)."""
    low = peak * ratio
    if warmup and step <= warmup:
        return peak * step / warmup
    if style == "constant":
        return peak
    if step > decay_iters:
        return low
    frac = (step - warmup) / (decay_iters - warmup)
    if style == "linear":
        return low + (peak - low) * (1 - frac)
    if style == "cosine":
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * frac))
    start = decay_iters - wsd_iters  # WSD: flat, then linear to the minimum over the last wsd_iters
    return peak if step <= start else low + (peak - low) * (1 - (step - start) / wsd_iters)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "WSD"])
def test_schedule_scales_every_group_from_its_own_peak(style):
    """The paper's pretraining shape: warmup 250, WSD decay from 8160 of 9600, min ratio 0.1."""
    from moc_megatron.training.optim import build_scheduler

    cfg = tiny(lr=3e-4, min_lr=3e-5, memory_layer_lr=6e-4, memory_bank_lr=6e-4, train_iters=9600,
               lr_warmup_iters=250, lr_decay_style=style, lr_wsd_decay_iters=1440)
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "name": n, "max_lr": peak,
                              "min_lr": peak * 0.1} for n, peak in
                             (("backbone", 3e-4), ("memory_layers", 6e-4), ("bank", 6e-4))])
    sched = build_scheduler(opt, cfg)
    for step in range(0, 9601):
        if step in (0, 1, 125, 250, 251, 4000, 8160, 8161, 8800, 9599, 9600):
            for g in opt.param_groups:
                want = _reference_lr(step, g["max_lr"], 0.1, 250, 9600, style, 1440)
                assert g["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), (style, step, g["name"])
        sched.step(1)


def test_deepspeed_json_wins_where_it_speaks_and_flags_fill_the_rest(tmp_path):
    from moc_megatron.errors import UserError
    from moc_megatron.training.engine import adopt_deepspeed_json, deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": true}, "gradient_accumulation_steps": 3,'
                    ' "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}')
    cfg = tiny(deepspeed_config=str(path), micro_batch_size=2, global_batch_size=4, clip_grad=0.5, zero_stage=1)
    ds = adopt_deepspeed_json(cfg, world_size=2)
    t = cfg.training
    assert (t.zero_stage, t.global_batch_size, t.micro_batch_size, t.clip_grad, t.bf16) == (2, 12, 2, 0.5, False)
    full = deepspeed_config(cfg, type("Ctx", (), {"dp_size": 2})(), ds)
    assert full["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert (full["train_batch_size"], full["gradient_accumulation_steps"], full["gradient_clipping"]) == (12, 3, 0.5)
    path.write_text('{"scheduler": {"type": "WarmupLR"}}')
    with pytest.raises(UserError, match="remove 'scheduler'"):
        adopt_deepspeed_json(tiny(deepspeed_config=str(path)), world_size=1)


# ---------------------------------------------------------------------------------------------
# Runs on a DeepSpeed engine


def _open_memory_branches(model):
    """W_O starts at zero, which would leave the memory branch and the bank without gradient at step 1."""
    with torch.no_grad():
        for block in model.layers:
            if block.memory is not None:
                block.memory.memory_attn.o_proj.weight.normal_(0.0, 0.02)


def _one_step_deltas(rank, world_size, cfg):
    initial, final, run = train_with_snapshot(cfg, prepare=_open_memory_branches)
    lrs = run.history[0].lrs
    return {n: (final[n] - initial[n]).abs().max().item() for n in initial}, lrs


def test_each_group_moves_by_its_own_learning_rate():
    """Adam's first step moves a weight by lr * |g| / (|g| + eps) = lr (eps tiny): per group, max |dw| = lr."""
    cfg = tiny(train_iters=1, lr=1e-3, min_lr=1e-3, memory_layer_lr=3e-3, memory_bank_lr=2e-3,
               weight_decay=0.0, clip_grad=0.0, adam_eps=1e-15)
    deltas, lrs = run_ranks(_one_step_deltas, 1, (cfg,), timeout=240)[0]
    assert lrs == pytest.approx({"backbone": 1e-3, "memory_layers": 3e-3, "bank": 2e-3})
    for name, delta in deltas.items():
        lr = 2e-3 if name.startswith("banks.") else 3e-3 if ".memory." in name else 1e-3
        assert delta == pytest.approx(lr, rel=1e-3), name


def _frozen_runs(rank, world_size, cfgs):
    out = []
    for cfg in cfgs:
        initial, final, run = train_with_snapshot(cfg)
        out.append((initial, final, [g["name"] for g in run.engine.optimizer.param_groups]))
    return out


def test_frozen_bank_stays_bitwise_unchanged_while_the_rest_trains():
    cfgs = [tiny(train_iters=2, freeze_memory_bank=True, zero_stage=stage) for stage in (0, 2)]
    for initial, final, group_names in run_ranks(_frozen_runs, 1, (cfgs,), timeout=240)[0]:
        assert not any(n.startswith("bank") for n in group_names)
        bank = [n for n in initial if n.startswith("banks.")]
        assert bank and all(torch.equal(initial[n], final[n]) for n in bank)
        for name in ("embed_tokens.weight", "layers.1.memory.memory_attn.o_proj.weight",
                     "layers.1.memory.router.proj.weight"):
            assert not torch.equal(initial[name], final[name]), name


def _nan_scenarios(rank, world_size, stop_cfg, skip_cfgs, clean_cfgs):
    from moc_megatron.errors import UserError
    from moc_megatron.training.trainer import train

    out = {"stop": None, "skip": []}
    try:
        train_with_snapshot(stop_cfg, nan_at=2)
    except UserError as e:
        out["stop"] = str(e)
    for cfg_nan, cfg_clean in zip(skip_cfgs, clean_cfgs):
        _, skipped, run = train_with_snapshot(cfg_nan, nan_at=cfg_nan.training.train_iters)
        clean = train(cfg_clean)
        out["skip"].append((cfg_nan.training.zero_stage, [r.skipped for r in run.history], skipped,
                            optimizer_tensors(run.engine), params_of(clean.engine.module),
                            optimizer_tensors(clean.engine)))
    return out


@pytest.fixture(scope="module")
def nan_results():
    common = dict(lr_decay_style="cosine", lr_decay_iters=3, nan_policy="skip")
    skip = [tiny(train_iters=3, zero_stage=z, **common) for z in (0, 1, 2)]
    clean = [tiny(train_iters=2, zero_stage=z, **common) for z in (0, 1, 2)]
    return run_ranks(_nan_scenarios, 1, (tiny(train_iters=3, nan_policy="stop"), skip, clean), timeout=300)[0]


def test_nan_loss_stops_the_run_naming_the_iteration(nan_results):
    message = nan_results["stop"]
    assert message is not None and "iteration 2" in message and "nan-policy" in message


def test_nan_loss_skip_leaves_weights_and_optimizer_state_untouched_under_zero_0_1_2(nan_results):
    """NaN in the last of 3 steps under --nan-policy skip == a clean run of the first 2 steps."""
    assert [r[0] for r in nan_results["skip"]] == [0, 1, 2]
    for stage, flags, skipped, state, clean, clean_state in nan_results["skip"]:
        assert flags == [False, False, True], stage
        for name in clean:
            assert torch.equal(skipped[name], clean[name]), (stage, name)
        assert len(state) == len(clean_state) > 0, stage
        assert all(torch.equal(a, b) for a, b in zip(state, clean_state)), stage
