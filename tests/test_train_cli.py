"""The entry point as a user meets it: flags, the progress line, --log-jsonl, TensorBoard, user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config", "configs/train/moc-tiny.yaml", "--num-layers", "2", "--memory-layers", "1",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr-warmup-iters", "1"]


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra) -> dict:
    """This process's environment without the distributed variables an in-process world may have set."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**env, **extra}


def moc_train(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = clean_env()
    return subprocess.run([sys.executable, "-m", "moc_megatron.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_entry_point_flags_are_the_config_flags_and_the_launcher_local_rank():
    import argparse

    from moc_megatron.config import add_config_args
    from moc_megatron.train import build_parser

    def flags(parser):
        return {o for a in parser._actions for o in a.option_strings}

    assert flags(build_parser()) == flags(add_config_args(argparse.ArgumentParser())) | {"--local_rank", "--local-rank"}
    args = build_parser().parse_args(["--local_rank=3", "--lr", "1e-3"])  # what the deepspeed launcher appends
    assert args.local_rank == 3


def test_user_error_prints_one_line_and_exits_2():
    result = moc_train([*FAST, "--hidden-size", "130", "--train-iters", "1"])
    assert result.returncode == 2, result.stderr
    assert "error: --hidden-size=130" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_command_line_run_logs_progress_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = moc_train([*FAST, "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2",
                        "--eval-iters", "1", "--deepspeed-config", "configs/deepspeed/zero2.json",
                        "--log-jsonl", str(tmp_path / "log.jsonl"), "--tensorboard-dir", str(tmp_path / "tb")])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "ZeRO 2" in out  # the JSON's stage; flags filled the rest
    line = next(x for x in out.splitlines() if x.startswith("iter 2/4"))
    for part in ("loss", "lm", "lb", "z", "lr", "grad", "tok/s", "TFLOP/s", "MFU", "elapsed", "ETA"):
        assert re.search(rf"(^|[ |]){re.escape(part)}([ |,]|$)", line), part
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_lm_loss" in r]
    assert [r["iteration"] for r in steps] == [2, 4] and [r["iteration"] for r in evals] == [2, 4]
    for key in ("iteration", "loss", "lm_loss", "load_balance_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec"):
        assert all(r[key] is not None for r in steps), key
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lm_loss", "train/load_balance_loss", "train/z_loss", "train/grad_norm",
                "lr/backbone", "lr/memory_layers", "lr/bank", "perf/tokens_per_sec", "perf/tflops_per_device",
                "router/layer1/entropy", "router/layer1/chapters_used", "router/layer1/max_load", "eval/lm_loss"):
        assert tag in scalars, tag
    assert "router/layer1/chapter_usage" in acc.Tags()["histograms"]
