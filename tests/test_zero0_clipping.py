"""ZeRO 0 in fp32: the gradient norm is the whole model's, and clipping uses it, at every layout.

DeepSpeed's own ZeRO 0 clipping counts a tied embedding once per pipeline stage holding it, so with the
clip binding PP=2 would leave the single-process trajectory. Here every step's loss and logged norm at
TP=2 and PP=2 follow one process within 1e-5, with the clip binding on every step, and the norm equals
ZeRO 1's (DeepSpeed's, summed in fp64). AdamW's first update does not depend on the gradient's scale;
later ones do through the moments, so a wrong clip shows in the losses from step 3 on (4 steps here).
(Chapter parallelism needs ZeRO 1 or 2: the config refuses EP>1 at ZeRO 0.)
"""

from __future__ import annotations

import pytest

from multiproc import run_ranks
from test_resume_layouts import _assert_follows, _cfg

CLIP = 0.05
STEPS = 4


def _run(rank, world_size, layout, zero=0):
    from moc_megatron.training.trainer import train

    cfg = _cfg(**layout, zero=zero, iters=STEPS)
    cfg.training.clip_grad = CLIP
    return [(r.loss, r.grad_norm) for r in train(cfg).history]


@pytest.fixture(scope="module")
def one_process():
    history = run_ranks(_run, 1, ({},), timeout=300)[0]
    assert all(norm > 2 * CLIP for _, norm in history), history  # the clip binds on every step
    return history


@pytest.mark.slow
def test_zero0_norm_equals_zero1s(one_process):
    zero1 = run_ranks(_run, 1, ({}, 1), timeout=300)[0]
    _assert_follows(one_process, zero1, 0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["TP2", "PP2"])
def test_zero0_norm_and_clipping_follow_one_process(one_process, layout):
    ranks = run_ranks(_run, 2, (layout,), timeout=300)
    for history in ranks:
        assert all(norm is not None for _, norm in history), history
        _assert_follows(history, one_process, 0)
