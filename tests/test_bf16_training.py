"""--bf16 on the CPU (DeepSpeed's CPU accelerator has bf16): the model really runs in bf16, gradients are
accumulated in fp32 under ZeRO 1/2, each optimizer group keeps its learning rate, a 100-step run tracks
the fp32 run, and chapter parallelism agrees with one chapter-parallel rank to bf16's resolution.

bf16 keeps 8 significant bits: one rounding changes a value by at most u = 2^-8 relative (unit round-off).
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from moc_megatron.config import load_config
from multiproc import run_ranks
from test_train import _open_memory_branches, tiny, train_with_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = 2.0**-8  # bf16's unit round-off


def _quiet_train(cfg, prepare=None):
    """train_with_snapshot with stdout and stderr captured: (initial, final, run, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        initial, final, run = train_with_snapshot(cfg, prepare=prepare)
    return initial, final, run, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------
# 100 steps of moc-tiny, bf16 against fp32


def moc_tiny(bf16: bool):
    """configs/train/moc-tiny.yaml (warmup 20, cosine to 1e-4, clip 1, ZeRO 1) cut to seq 64 and 2 x 2
    sequences per step (2 micro-batches accumulated), 100 steps, logged every 10."""
    return load_config(os.path.join(ROOT, "configs/train/moc-tiny.yaml"),
                       training=dict(seq_length=64, micro_batch_size=2, global_batch_size=4, train_iters=100,
                                     log_interval=10, eval_interval=0, bf16=bf16))


def _tiny_runs(rank, world_size):
    out = {}
    for bf16 in (False, True):
        dtypes = set()

        def record_forward_dtype(model):
            model.register_forward_pre_hook(lambda m, args: dtypes.add(next(m.parameters()).dtype))

        _, _, run, stdout, _ = _quiet_train(moc_tiny(bf16), prepare=record_forward_dtype)
        out[bf16] = {"history": run.history, "dtypes": dtypes, "stdout": stdout}
    return out


@pytest.fixture(scope="module")
def tiny_runs():
    return run_ranks(_tiny_runs, 1, timeout=600)[0]


@pytest.mark.slow
def test_bf16_moc_tiny_tracks_fp32_loss_within_2_percent_at_every_logged_step(tiny_runs):
    """Same seed, same data. The runs start from the same weights and part by round-off, so the logged
    per-step losses (one 256-token step each, no smoothing) must stay within 2%; measured: under 1%.
    The loss falls by a third over the run, so a bf16 run that trains worse fails."""
    fp32, bf16 = ([r.lm_loss for r in tiny_runs[b]["history"]] for b in (False, True))
    assert len(fp32) == len(bf16) == 100
    logged = [i for i in range(1, 101) if i % 10 == 0]
    for it in logged:
        a, b = fp32[it - 1], bf16[it - 1]
        assert abs(a - b) <= 0.02 * a, f"iteration {it}: bf16 {b:.4f} vs fp32 {a:.4f}"
    assert fp32[-1] < 0.67 * fp32[0] and bf16[-1] < 0.67 * bf16[0], "both runs must learn"


@pytest.mark.slow
def test_bf16_casts_the_model_for_its_forward_on_cpu(tiny_runs):
    assert tiny_runs[True]["dtypes"] == {torch.bfloat16}
    assert tiny_runs[False]["dtypes"] == {torch.float32}


@pytest.mark.slow
def test_startup_names_precision_device_and_chapter_ops_backend(tiny_runs):
    from moc_megatron.ops import backend

    for bf16, name in ((True, "bf16"), (False, "fp32")):
        lines = [x for x in tiny_runs[bf16]["stdout"].splitlines() if x.startswith("world ")]
        assert len(lines) == 1 and lines[0].endswith(f"{name} on cpu; chapter ops: {backend()}"), lines


@pytest.mark.slow
def test_run_history_keeps_python_numbers_not_tensors(tiny_runs):
    for record in tiny_runs[True]["history"]:
        values = [*vars(record).values(), *record.lrs.values()]
        assert record.router == [] and not any(isinstance(v, torch.Tensor) for v in values), record
        assert all(isinstance(getattr(record, k), float) for k in ("loss", "lm_loss", "load_balance_loss", "grad_norm"))


# ---------------------------------------------------------------------------------------------
# What DeepSpeed is given, and does, under bf16


def _zero_stages(rank, world_size):
    out = {}
    for name, cfg in {"fp32": tiny(train_iters=2, zero_stage=1),
                      **{f"bf16_zero{z}": tiny(train_iters=2, zero_stage=z, bf16=True) for z in (0, 1, 2)}}.items():
        _, _, run, _, stderr = _quiet_train(cfg)
        model_dtype, accum_dtype = run.engine.get_data_types()
        out[name] = {"dtypes": (model_dtype, accum_dtype), "grad_norms": [r.grad_norm for r in run.history],
                     "stderr": stderr}
    return out


@pytest.fixture(scope="module")
def zero_stages():
    return run_ranks(_zero_stages, 1, timeout=600)[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_gradients_accumulate_in_fp32_under_zero_1_and_2(zero_stages, stage):
    """Two micro-batches a step: the accumulated gradient's norm is the fp32 run's to bf16's resolution
    (a bf16 micro-batch gradient counted twice would be far off)."""
    run = zero_stages[f"bf16_zero{stage}"]
    assert run["dtypes"] == (torch.bfloat16, torch.float32)
    for got, want in zip(run["grad_norms"], zero_stages["fp32"]["grad_norms"]):
        assert abs(got - want) <= 2 * U * want


@pytest.mark.slow
def test_bf16_under_zero_0_warns_that_deepspeed_accumulates_in_bf16(zero_stages):
    run = zero_stages["bf16_zero0"]
    assert run["dtypes"] == (torch.bfloat16, torch.bfloat16)
    assert "--bf16 --zero-stage 0" in run["stderr"] and "accumulates gradients in bf16" in run["stderr"]


def test_shipped_deepspeed_configs_accumulate_gradients_in_fp32():
    for name in ("zero1.json", "zero2.json"):
        ds = json.load(open(os.path.join(ROOT, "configs", "deepspeed", name)))
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}, name


def test_generated_deepspeed_config_accumulates_bf16_gradients_in_fp32_where_deepspeed_can():
    from types import SimpleNamespace

    from moc_megatron.errors import UserError
    from moc_megatron.training.engine import deepspeed_config

    ctx = SimpleNamespace(dp_size=1)
    for stage, want in ((0, None), (1, "fp32"), (2, "fp32")):
        got = deepspeed_config(tiny(bf16=True, zero_stage=stage), ctx, {}).get("data_types", {}).get("grad_accum_dtype")
        assert got == want, stage
    assert "data_types" not in deepspeed_config(tiny(zero_stage=1), ctx, {})
    with pytest.raises(UserError, match="grad_accum_dtype fp32 with bf16 needs --zero-stage 1 or 2"):
        deepspeed_config(tiny(bf16=True, zero_stage=0), ctx, {"data_types": {"grad_accum_dtype": "fp32"}})


def _first_step_moves(rank, world_size, cfgs):
    out = {}
    for stage, cfg in cfgs.items():
        initial, final, run, _, _ = _quiet_train(cfg, prepare=_open_memory_branches)
        out[stage] = ({n: (final[n] - initial[n].bfloat16().float()).abs().max().item() for n in initial},
                      run.history[0].lrs, type(run.engine.optimizer).__name__)
    return out


@pytest.mark.slow
def test_bf16_each_optimizer_group_moves_by_its_own_learning_rate_under_zero_0_and_1():
    """Adam's first step moves every weight with a gradient by its group's lr (eps negligible), as in
    test_train's fp32 test. Powers of two, so that 1 - lr is a bf16 number for the norms' unit weights;
    elsewhere the bf16 weight rounds the fp32 master by at most u |w| (|w| < 0.13: under 4% of lr)."""
    lrs = {"backbone": 2.0**-7, "memory_layers": 2.0**-6, "bank": 2.0**-5}
    cfgs = {stage: tiny(train_iters=1, bf16=True, zero_stage=stage, lr=lrs["backbone"], min_lr=lrs["backbone"],
                        memory_layer_lr=lrs["memory_layers"], memory_bank_lr=lrs["bank"], weight_decay=0.0,
                        clip_grad=0.0, adam_eps=1e-15) for stage in (0, 1)}
    for stage, (moves, used, optimizer) in run_ranks(_first_step_moves, 1, (cfgs,), timeout=300)[0].items():
        assert used == pytest.approx(lrs), stage
        for name, move in moves.items():
            group = "bank" if name.startswith("banks.") else "memory_layers" if ".memory." in name else "backbone"
            lr = lrs[group]
            assert move == pytest.approx(lr, rel=0.04), (stage, optimizer, name)


# ---------------------------------------------------------------------------------------------
# Chapter parallelism in bf16


def _ep_runs(rank, world_size, cfgs):
    from moc_megatron.training.bank_io import local_banks

    out = {}
    for ep, cfg in cfgs.items():
        initial, _, run, _, _ = _quiet_train(cfg, prepare=_open_memory_branches)
        bank = local_banks(run.engine.module)[0]
        out[ep] = {"steps": [(r.loss, r.lm_loss, r.grad_norm) for r in run.history], "first": bank.first_routed,
                   "routed": bank.routed.detach().float().clone(),
                   "initial": initial["banks.0.routed"].bfloat16().float()}
    return out


@pytest.mark.slow
def test_bf16_ep2_matches_ep1_to_bf16_resolution():
    """DP=2 on 2 gloo ranks, chapters sharded over both (EP=2) or not (EP=1); ZeRO 1, bf16, 4 steps.
    EP moves chapters and reorders sums; it changes no value beyond bf16 round-off (u each time). So the
    fp32 losses, means over 128 tokens, agree within u (measured ~2e-5), the gradient norms within 2u, and
    the routed bank's update (gathered over the EP ranks) points the same way: cosine >= 1 - 2u (measured
    0.9987; a chapter read or reduced on the wrong ranks decorrelates its rows' updates)."""
    cfgs = {}
    for ep in (1, 2):
        cfgs[ep] = tiny(train_iters=4, bf16=True, zero_stage=1, lr=1e-3, min_lr=1e-3)
        cfgs[ep].parallel.expert_model_parallel_size = ep
    ranks = run_ranks(_ep_runs, 2, (cfgs,), timeout=600)
    shared = cfgs[2].memory.shared_chapters
    assert [r[2]["first"] for r in ranks] == [shared, shared + 64]  # global ids of each rank's first chapter
    for step, (one, two) in enumerate(zip(ranks[0][1]["steps"], ranks[0][2]["steps"]), start=1):
        for what, a, b, tol in (("loss", one[0], two[0], U), ("lm loss", one[1], two[1], U),
                                ("grad norm", one[2], two[2], 2 * U)):
            assert abs(a - b) <= tol * abs(a), f"step {step} {what}: EP=2 {b} vs EP=1 {a}"
    initial = ranks[0][1]["initial"]
    move_one = (ranks[0][1]["routed"] - initial).flatten()
    move_two = (torch.cat([r[2]["routed"] for r in ranks]) - initial).flatten()
    assert move_one.abs().max() > 1e-3, "the bank must have been trained"
    assert torch.nn.functional.cosine_similarity(move_one, move_two, dim=0) >= 1 - 2 * U
