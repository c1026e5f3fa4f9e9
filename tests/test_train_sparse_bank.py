"""--memory-bank-optimizer sparse_adam through the trainer: only chapters a step read move, and
resume is exact with the bank optimizer's state."""

import os

import pytest
import torch

from multiproc import run_ranks

from moc_megatron.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(save=None, load=None, iters=3, ep=1, bf16=False):
    return load_config(os.path.join(ROOT, "configs/train/moc-tiny.yaml"),
                       model={"num_layers": 2, "vocab_size": 256},
                       memory={"layers": [1], "tokens": 65 * 4, "chapters": 65, "top_k": 2},
                       parallel={"expert_model_parallel_size": ep},
                       training={"seq_length": 32, "micro_batch_size": 1, "global_batch_size": 2,
                                 "train_iters": iters, "lr_decay_iters": 4, "lr_warmup_iters": 0, "eval_interval": 0, "log_interval": 1,
                                 "memory_bank_optimizer": "sparse_adam", "zero_stage": 1, "mock_data": True,
                                 "save": save, "load": load, "seed": 9, "bf16": bf16})


def _run(rank, world_size, save, load, iters, ep, bf16=False):
    from moc_megatron.training.bank_io import local_banks
    from moc_megatron.training.trainer import train

    run = train(cfg_for(save, load, iters, ep, bf16))
    bank = local_banks(run.engine.module)[0]
    state = run.bank_optimizer.optimizer.state[bank.routed]
    return {"losses": [r.loss for r in run.history], "routed": bank.routed.detach().clone(),
            "first": bank.first_routed, "state_dtypes": {k: v.dtype for k, v in state.items() if k != "step"}}


def _init_routed():
    from moc_megatron.model.gpt import SeededBank
    from moc_megatron.parallel.state import single_process

    return SeededBank(cfg_for().resolve(), single_process(), 0).routed.detach()


@pytest.mark.slow
def test_sparse_adam_moves_only_read_chapters_and_resumes_exactly(tmp_path):
    straight = run_ranks(_run, 1, args=(None, None, 4, 1), timeout=600)[0]
    init = _init_routed()
    moved = (straight["routed"] - init).abs().sum((1, 2)) > 0
    assert 0 < int(moved.sum()) < moved.numel(), "some chapters must move and some stay untouched"
    assert torch.equal(straight["routed"][~moved], init[~moved])
    first = run_ranks(_run, 1, args=(str(tmp_path), None, 2, 1), timeout=600)[0]
    resumed = run_ranks(_run, 1, args=(None, str(tmp_path), 4, 1), timeout=600)[0]
    assert first["losses"] + resumed["losses"] == straight["losses"]
    assert torch.equal(resumed["routed"], straight["routed"])


@pytest.mark.slow
def test_sparse_adam_with_chapter_parallel_matches_one_process():
    one = run_ranks(_run, 1, args=(None, None, 3, 1), timeout=600)[0]
    two = run_ranks(_run, 2, args=(None, None, 3, 2), timeout=600)
    for a, b in zip(one["losses"], two[0]["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    full = torch.cat([r["routed"] for r in two])
    assert (full - one["routed"]).abs().max() <= 1e-4  # Adam on round-off: at most ~lr per step


@pytest.mark.slow
def test_sparse_adam_in_bf16_keeps_fp32_bank_state_and_resumes_bitwise(tmp_path):
    straight = run_ranks(_run, 1, args=(None, None, 4, 1, True), timeout=600)[0]
    assert straight["routed"].dtype == torch.bfloat16
    assert straight["state_dtypes"] == {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master": torch.float32}
    first = run_ranks(_run, 1, args=(str(tmp_path), None, 2, 1, True), timeout=600)[0]
    resumed = run_ranks(_run, 1, args=(None, str(tmp_path), 4, 1, True), timeout=600)[0]
    assert first["losses"] + resumed["losses"] == straight["losses"]
    assert torch.equal(resumed["routed"], straight["routed"])
