"""Checkpoints: exact resume, atomic save, --keep-last, incompatible configs, --finetune."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from moc_megatron.errors import UserError
from moc_megatron.training import checkpoint
from moc_megatron.training.resume import check_compatible
from multiproc import run_ranks
from test_train import params_of, tiny

N = 2  # resume after N of 2N steps


def _cfg(save=None, load=None, **kw):
    t = dict(train_iters=2 * N, lr_decay_iters=2 * N, lr_warmup_iters=1, lr_decay_style="cosine", save=save,
             load=load, eval_interval=2, eval_iters=1)
    t.update(kw)
    return tiny(**t)


def _losses(run):
    return [(r.loss, r.lm_loss, r.load_balance_loss, r.z_loss, r.grad_norm) for r in run.history]


def _resume_scenarios(rank, world_size, root):
    from moc_megatron.errors import UserError
    from moc_megatron.training.trainer import build, train

    out = {"straight": _losses(train(_cfg()))}
    first = train(_cfg(save=f"{root}/a", train_iters=N))
    second = train(_cfg(save=f"{root}/a", load=f"{root}/a"))
    out.update(first=_losses(first), second=_losses(second), second_start=second.start_iteration,
               resumed_params=params_of(second.engine.module), evals=first.evals + second.evals)
    try:
        build(tiny(memory=dict(top_k=4), load=f"{root}/a", train_iters=2 * N))
    except UserError as e:
        out["incompatible"] = str(e)
    ft = build(tiny(memory=dict(top_k=4), load=f"{root}/a", finetune=True, seq_length=64, train_iters=1,
                    lr=1e-4, min_lr=1e-5))
    out.update(finetune_start=ft.iteration, finetune_steps=ft.scheduler.num_steps,
               finetune_params=params_of(ft.engine.module))
    return out


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    return run_ranks(_resume_scenarios, 1, (str(tmp_path_factory.mktemp("ckpt")),), timeout=300)[0]


@pytest.mark.slow
def test_resume_reproduces_the_straight_run_bitwise(scenarios):
    assert scenarios["second_start"] == N
    assert scenarios["first"] + scenarios["second"] == scenarios["straight"]
    assert scenarios["straight"][-1][0] < scenarios["straight"][0][0]


@pytest.mark.slow
def test_checkpoint_with_other_routing_is_refused_naming_the_flag(scenarios):
    msg = scenarios.get("incompatible")
    assert msg is not None and "--memory-top-k is 8 there and 4 here" in msg and "--finetune" in msg


@pytest.mark.slow
def test_finetune_takes_the_weights_only(scenarios):
    """Other seq length and top-k are fine for --finetune; schedule and data start from zero."""
    assert scenarios["finetune_start"] == 0 and scenarios["finetune_steps"] == 0
    for name, p in scenarios["resumed_params"].items():
        assert torch.equal(scenarios["finetune_params"][name], p), name


# ---------------------------------------------------------------------------------------------
# Atomic save and --keep-last, with a stand-in for the state files (no DeepSpeed needed)


class FakeEngine:
    def __init__(self, iteration: int, fail_at: int | None = None):
        self.iteration, self.fail_at = iteration, fail_at

    def write_state(self, path):
        os.makedirs(os.path.join(path, "model"), exist_ok=True)
        torch.save({"iteration": self.iteration}, os.path.join(path, "model", "__0_0.distcp"))
        if self.iteration == self.fail_at:
            raise KeyboardInterrupt("killed while writing")


def _save(root, iteration, keep_last=0, fail_at=None):
    cfg = tiny(save=str(root), keep_last=keep_last)
    ctx = SimpleNamespace(dp_size=1, tp_size=1, pp_size=1, ep_size=1)
    sched = SimpleNamespace(state_dict=lambda: {"num_steps": iteration})
    real, checkpoint.write_state = checkpoint.write_state, lambda engine, cfg, ctx, path, pause: engine.write_state(path)
    try:
        return checkpoint.save(FakeEngine(iteration, fail_at), sched, cfg, ctx, iteration, iteration * 4)
    finally:
        checkpoint.write_state = real


def test_run_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path, ctx):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, fail_at=3)
    assert checkpoint.latest_tag(str(tmp_path)) == "iter_0000002"
    assert not (tmp_path / "iter_0000003").exists() and (tmp_path / "iter_0000003.tmp").exists()
    _save(tmp_path, 3)  # the next save clears the half-written one
    assert checkpoint.latest_tag(str(tmp_path)) == "iter_0000003"
    assert not (tmp_path / "iter_0000003.tmp").exists()
    assert (tmp_path / "iter_0000003" / "moc_checkpoint.json").exists()


def test_keep_last_keeps_the_newest_k(tmp_path, ctx):
    for it in range(1, 6):
        _save(tmp_path, it, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["iter_0000004", "iter_0000005"]
    assert checkpoint.latest_tag(str(tmp_path)) == "iter_0000005"


def test_load_without_latest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no 'latest' file"):
        checkpoint.latest_tag(str(tmp_path))


def test_incompatible_weights_named_even_for_finetune():
    saved = tiny().to_dict()
    cfg = tiny(finetune=True, load="x")
    cfg.model.num_layers = 3
    meta = {"config": saved, "layout": {"dp_size": 1}}
    with pytest.raises(UserError, match="--num-layers is 2 there and 3 here"):
        check_compatible(meta, cfg, SimpleNamespace(dp_size=1), "ckpt/iter_0000002")
    cfg = tiny(finetune=True, load="x", seq_length=128, memory_bank_lr=1e-5)
    check_compatible(meta, cfg, SimpleNamespace(dp_size=1), "ckpt/iter_0000002")  # fine for finetuning
