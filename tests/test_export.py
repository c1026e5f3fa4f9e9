"""Checkpoints saved at any TP x PP x EP layout merge into the same Hugging Face model.

Each layout trains the tiny model for 2 steps through the real trainer and saves; the converter
merges the checkpoint; the merged weights must equal the single-process run's (to fp32 round-off of
the different reductions) and the exported model's logits must equal the merged training model's.
"""

import os
import subprocess
import sys

import pytest
import torch

from multiproc import run_ranks

from moc_megatron.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Adam moves a weight by at most ~lr a step, so two layouts whose gradients differ by round-off end
# 2 steps apart by <= 2 lr, while a misplaced shard differs by the init scale (std 0.02).
LR = 1e-4
WEIGHT_ATOL = 5e-4


def tiny(save, tp=1, pp=1, ep=1, **memory):
    return load_config(os.path.join(ROOT, "configs/train/moc-tiny.yaml"),
                       model={"num_layers": 2, "vocab_size": 256},
                       memory={"layers": [0, 1], "tokens": 9 * 8, "chapters": 9, "top_k": 2,
                               "aux_loss_dp_average": False, **memory},  # per micro-batch, as one process
                       parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                 "expert_model_parallel_size": ep},
                       training={"seq_length": 32, "micro_batch_size": 1, "global_batch_size": 4, "train_iters": 2,
                                 "lr_warmup_iters": 0, "lr": LR, "min_lr": LR / 10, "memory_layer_lr": LR,
                                 "memory_bank_lr": LR, "eval_interval": 0, "log_interval": 1, "save": save,
                                 "log_jsonl": os.path.join(save, "log.jsonl"),
                                 "zero_stage": 1, "mock_data": True, "seed": 5})


def _train(rank, world_size, save, tp, pp, ep):
    from moc_megatron.training.trainer import train

    train(tiny(save, tp, pp, ep))
    return True


def merged(path):
    from moc_megatron.training.export import merged_state_dict, resolve_tag

    return merged_state_dict(resolve_tag(path, None))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("single"))
    run_ranks(_train, 1, args=(save, 1, 1, 1), timeout=600)
    return merged(save)


LAYOUTS = {"tp2": (2, 2, 1, 1), "pp2": (2, 1, 2, 1), "ep2": (2, 1, 1, 2), "tp2_ep2": (4, 2, 1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_checkpoint_merges_to_the_single_process_weights(single, tmp_path, layout):
    world, tp, pp, ep = LAYOUTS[layout]
    run_ranks(_train, world, args=(str(tmp_path), tp, pp, ep), timeout=900)
    cfg, state = merged(str(tmp_path))
    ref_cfg, ref = single
    if ep > 1:  # every rank's chapter all-to-all traffic is logged per step
        import json

        rec = json.loads(open(tmp_path / "log.jsonl").readline())
        assert len(rec["chapter_bytes_sent"]) == world and min(rec["chapter_bytes_sent"]) > 0
        assert sum(rec["chapter_bytes_sent"]) == sum(rec["chapter_bytes_received"])
    assert set(state) == set(ref), set(state) ^ set(ref)
    for name, tensor in ref.items():
        assert state[name].shape == tensor.shape, name
        diff = (state[name].float() - tensor.float()).abs().max().item()
        assert diff <= WEIGHT_ATOL, f"{layout}: {name} differs by {diff:.2e}"


@pytest.mark.slow
def test_convert_cli_exports_and_verifies(single, tmp_path):
    """The single-process checkpoint through the CLI: export, --verify (logits equal, causality)."""
    save = tmp_path / "ckpt"
    run_ranks(_train, 1, args=(str(save), 1, 1, 1), timeout=600)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/convert_to_hf.py"), "--checkpoint", str(save),
                           "--output", str(out), "--verify"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |logit difference|" in proc.stdout and "NOT causal" in proc.stdout  # sequence routing leaks
    assert (out / "config.json").exists() and (out / "modeling_moc.py").exists()


def test_convert_refuses_what_it_cannot_read(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/convert_to_hf.py"), "--checkpoint",
                           str(tmp_path / "nope"), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    (tmp_path / "ck" / "iter_0000001").mkdir(parents=True)
    (tmp_path / "ck" / "latest").write_text("iter_0000001")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/convert_to_hf.py"), "--checkpoint",
                           str(tmp_path / "ck"), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a complete moc-megatron checkpoint" in proc.stderr
    assert not (tmp_path / "out").exists()
