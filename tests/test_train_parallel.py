"""Data parallelism: DP=2 under ZeRO-1 and ZeRO-2 follows DP=1 step for step (fp32, CPU, gloo).

The router's load-balance statistics f and P are averaged over the data-parallel group by default
(memory.aux_loss_dp_average). Two comparisons follow from that:

* With the average off, every micro-batch computes its own aux losses, so DP=2 (micro 2, no
  accumulation) must equal DP=1 with gradient accumulation (2 micro-batches of 2): same samples per step
  (layout-independent data order), same per-micro-batch losses, gradients averaged the same way.
* With the average on, DP=2's f and P cover both ranks' sequences: that equals DP=1 reading the whole
  global batch as one micro-batch (not DP=1 with accumulation, whose f and P cover one micro-batch).
"""

from __future__ import annotations

import pytest

from multiproc import run_ranks
from test_train import tiny

STEPS = 4


def _cfg(micro: int, zero_stage: int, dp_average: bool):
    return tiny(memory=dict(aux_loss_dp_average=dp_average), train_iters=STEPS, micro_batch_size=micro,
                global_batch_size=4, zero_stage=zero_stage, lr=2e-3, min_lr=2e-4, lr_warmup_iters=1,
                lr_decay_style="cosine", clip_grad=1.0)


def _runs(rank, world_size, cfgs):
    from moc_megatron.training.trainer import train

    out = {}
    for name, cfg in cfgs.items():
        run = train(cfg)
        out[name] = [(r.loss, r.lm_loss, r.load_balance_loss, r.z_loss, r.grad_norm) for r in run.history]
    return out


@pytest.fixture(scope="module")
def results():
    single = run_ranks(_runs, 1, ({"accumulate": _cfg(2, 1, False), "whole_batch": _cfg(4, 1, True)},),
                       timeout=300)[0]
    dp2 = run_ranks(_runs, 2, ({"zero1": _cfg(2, 1, False), "zero2": _cfg(2, 2, False),
                                "zero1_dp_average": _cfg(2, 1, True)},), timeout=300)
    assert dp2[0] == dp2[1], "ranks disagree on the logged (all-reduced) losses"
    return {**single, **dp2[0]}


def _assert_same(got, want):
    assert len(got) == len(want) == STEPS
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), f"step {step}: {a} vs {b}"


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero1", "zero2"])
def test_dp2_matches_dp1_with_gradient_accumulation(results, zero):
    _assert_same(results[zero], results["accumulate"])
    assert results["accumulate"][-1][0] < results["accumulate"][0][0]  # it trains


@pytest.mark.slow
def test_dp2_with_dp_averaged_router_statistics_matches_dp1_on_the_whole_batch(results):
    _assert_same(results["zero1_dp_average"], results["whole_batch"])
