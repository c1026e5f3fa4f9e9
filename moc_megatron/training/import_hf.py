"""The way back from Hugging Face: an exported MoC model, or a Llama model, as a training checkpoint at any
TP x PP x EP layout, so instruction tuning can start from it.

    moc-convert-from-hf --hf-model hf/moc-tiny --save runs/from-hf [--config RECIPE.yaml]
        [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] [--expert-model-parallel-size E]
    moc-train --config RECIPE.yaml --config runs/from-hf/model.yaml --load runs/from-hf --finetune ...

The checkpoint is written by the training code itself: each of the T x P x E ranks of the target layout
builds its part of the model exactly as a training run does, reads only its part of the safetensors
(tensor-parallel slices on their partition dimension, its pipeline stage's layers, its chapters by global
chapter id), and saves iteration 0 through the trainer's checkpoint writer (atomic, with ``latest``).
As a plain process the tool starts those ranks itself (local gloo processes); under torchrun or the
deepspeed launcher it is one of them. Model and memory settings come from the Hugging Face config.json
and are also written to SAVE/model.yaml, for the fine-tuning run's --config. The vocabulary keeps the
Hugging Face rows; where the target TP size needs more (padding), the extra rows are zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from moc_megatron.config import Config, add_config_args, config_from_args, flag_name, from_dict
from moc_megatron.errors import UserError
from moc_megatron.hf.convert import HF_PREFIX, TIED_HEAD, HFWeights, check_names, config_from_hf
from moc_megatron.model.gpt import padded_vocab_size
from moc_megatron.model.pipeline import single_process_name
from moc_megatron.training import checkpoint
from moc_megatron.training.bank_io import local_banks
from moc_megatron.training.checkpoint import atomic_write
from moc_megatron.training.export import tp_dim
from moc_megatron.training.resume import WEIGHT_FIELDS

MODEL_YAML = "model.yaml"


# ---------------------------------------------------------------------------------------------
# Config


def read_hf_config(hf_dir: str) -> dict:
    """The model and memory sections the Hugging Face directory's config.json describes."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"--hf-model {hf_dir}: no config.json there (not a Hugging Face model directory)")
    try:
        return config_from_hf(json.loads(path.read_text()), str(path))
    except (ValueError, KeyError) as e:
        raise UserError(f"{path}: {e}") from None


def conversion_config(args: argparse.Namespace) -> Config:
    """Recipe files, then the Hugging Face model's settings, then the flags; flags that would change a
    weight's shape are refused."""
    hf = read_hf_config(args.hf_model)
    given = {tuple(k.split(".", 1)): v for k, v in vars(args).items() if "." in k}
    clashes = [f"--{flag_name(s, k)} {v}" for (s, k), v in given.items()
               if k in WEIGHT_FIELDS.get(s, ()) and s in hf and k in hf[s] and hf[s][k] != v]
    if clashes:
        raise UserError(f"{', '.join(clashes)}: the model's shape comes from {args.hf_model}/config.json")
    cfg = config_from_args(args, between=hf)
    if not cfg.training.save:
        raise UserError("--save is required: the directory to write the checkpoint to")
    if cfg.parallel.expert_model_parallel_size > 1 and cfg.training.zero_stage == 0 and ("training", "zero_stage") not in given:
        cfg.training.zero_stage = 1  # chapter parallelism runs under ZeRO (as in training)
    return cfg


def layout_size(cfg: Config) -> int:
    p = cfg.parallel
    return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.expert_model_parallel_size


# ---------------------------------------------------------------------------------------------
# Weights


def load_hf_weights(model: torch.nn.Module, weights: HFWeights, cfg: Config, ctx) -> set[str]:
    """Copy this rank's part of every parameter from the Hugging Face weights; returns the names read."""
    pipeline = ctx.pp_size > 1
    used = set()
    banks = local_banks(model)
    bank_params = {id(p) for b in banks.values() for p in b.parameters()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in bank_params:
                continue
            hf_name = HF_PREFIX + (single_process_name(name, cfg) if pipeline else name)
            param.copy_(_part(weights, hf_name, tuple(param.shape), ctx))
            used.add(hf_name)
        for j, bank in banks.items():  # (chapters, t, d): shared chapters first, routed by global id
            hf_name = f"{HF_PREFIX}banks.{j}.weight"
            first, n = bank.first_routed, bank.routed.shape[0]
            bank.routed.copy_(weights.slice(hf_name, 0, first, first + n))
            if bank.shared is not None:
                bank.shared.copy_(weights.slice(hf_name, 0, 0, bank.n_shared))
            used.add(hf_name)
    return used


def _part(weights: HFWeights, name: str, local: tuple, ctx) -> torch.Tensor:
    """This TP rank's part of a weight: the whole tensor, or its slice on the dimension the export's
    merge concatenates (export.tp_dim)."""
    full = weights.shape(name)
    if full == local:
        return weights.get(name)
    if name == HF_PREFIX + "embed_tokens.weight":
        return _vocab_rows(weights, name, local, ctx)
    d = tp_dim(name)
    if d is None or full != local[:d] + (local[d] * ctx.tp_size,) + local[d + 1:]:
        raise UserError(f"{weights.dir}: {name} has shape {full}; tensor-parallel rank {ctx.tp_rank} of "
                        f"{ctx.tp_size} holds {local}, which is no slice of it")
    return weights.slice(name, d, ctx.tp_rank * local[d], (ctx.tp_rank + 1) * local[d])


def _vocab_rows(weights: HFWeights, name: str, local: tuple, ctx) -> torch.Tensor:
    """Vocab-parallel rows of the embedding; rows past the Hugging Face vocabulary (padding) are zero."""
    rows = weights.shape(name)[0]
    start = ctx.tp_rank * local[0]
    stop = min(start + local[0], rows)
    part = torch.zeros(local)
    if stop > start:
        part[: stop - start] = weights.slice(name, 0, start, stop)
    return part


def check_tied_head(weights: HFWeights) -> None:
    """The training model's output head is its embedding; an untied lm_head cannot be represented."""
    if TIED_HEAD in weights.where and not torch.equal(weights.get(TIED_HEAD), weights.get(HF_PREFIX + "embed_tokens.weight")):
        raise UserError(f"{weights.dir}: lm_head.weight differs from model.embed_tokens.weight; moc-megatron "
                        "models tie the output head to the embedding (SPEC 1), so this model cannot be imported")


def check_weight_names(weights: HFWeights, cfg: Config) -> None:
    """The weights are exactly the ones its config.json describes (ValueError naming the difference)."""
    got = {n[len(HF_PREFIX):] if n.startswith(HF_PREFIX) else n for n in weights.names() - {TIED_HEAD}}
    check_names(got, cfg.to_dict(), f"the weight set in {weights.dir}")


# ---------------------------------------------------------------------------------------------
# One rank


def convert(cfg: Config, hf_dir: str) -> str:
    """Run on every rank of the target layout: build, fill from the Hugging Face weights, save iteration 0."""
    from moc_megatron.training.trainer import build_model, setup, wrap

    ctx, ds = setup(cfg)
    weights = HFWeights(hf_dir)
    model = build_model(cfg, ctx)
    used = load_hf_weights(model, weights, cfg, ctx)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(used))
    unread = weights.names() - {TIED_HEAD} - set().union(*map(set, every))
    if unread:
        raise UserError(f"{hf_dir}: weights no rank read: {sorted(unread)[:5]}")
    engine, _, scheduler, _ = wrap(model, cfg, ctx, ds)
    path = checkpoint.save(engine, scheduler, cfg, ctx, 0, 0, origin=str(Path(hf_dir).resolve()))
    if dist.get_rank() == 0:
        m = {"model": dict(vars(cfg.model)), "memory": dict(vars(cfg.memory))}
        atomic_write(os.path.join(cfg.training.save, MODEL_YAML),
                      "# The model converted from " + str(Path(hf_dir).resolve()) + "\n"
                      + yaml.safe_dump(m, sort_keys=False))
    return path


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, hf_dir: str, threads: int) -> None:
    """A rank started by this tool (a plain process converting to a layout of several ranks)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    code = 0
    try:
        convert(from_dict(cfg_dict), hf_dir)
    except UserError as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        code = 2
    except BaseException:  # noqa: BLE001 - a rank's traceback, then the exit code the parent reads
        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    os._exit(code)  # a failed rank must not wait for peers that wait for it


def _spawn(cfg: Config, hf_dir: str, world: int) -> int:
    """Start the layout's ranks as local processes; the first failing rank's exit code (others are stopped)."""
    import time

    import torch.multiprocessing as mp

    from moc_megatron.parallel.net import free_port

    port, threads = free_port(), max(1, (os.cpu_count() or 1) // world)
    procs = [mp.get_context("spawn").Process(target=_rank_main, args=(r, world, port, cfg.to_dict(), hf_dir, threads))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs) and not any(p.exitcode for p in procs):
            time.sleep(0.2)
    finally:
        time.sleep(0.5)  # a failing rank's message lands before its peers are stopped
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    return next((p.exitcode for p in procs if p.exitcode), 0)


# ---------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moc-convert-from-hf", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-model", required=True, help="a Hugging Face directory: exported MoC, or Llama")
    add_config_args(p)  # --save, the layout flags, and a recipe (--config) for the rest of the run's settings
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launched = "RANK" in os.environ
    try:
        cfg = conversion_config(args)
        world = int(os.environ.get("WORLD_SIZE", layout_size(cfg))) if launched else layout_size(cfg)
        cfg.validate(world)
        save = Path(cfg.training.save)
        if (save / "latest").exists():
            raise UserError(f"--save {save}: already holds a checkpoint; name a new directory")
        weights = HFWeights(args.hf_model)
        check_weight_names(weights, cfg)
        check_tied_head(weights)
    except (UserError, ValueError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    rows, padded = cfg.model.vocab_size, padded_vocab_size(cfg.model.vocab_size, cfg.parallel.tensor_model_parallel_size)
    try:
        if launched or world == 1:  # this process is (one of) the layout's rank(s)
            convert(cfg, args.hf_model)
        else:
            code = _spawn(cfg, args.hf_model, world)
            if code:
                return code
    except UserError as e:
        print(f"error (rank {os.environ.get('RANK', 0)}): {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    p = cfg.parallel
    names = weights.names() - {TIED_HEAD}
    n = sum(math.prod(weights.shape(name)) for name in names)
    print(f"converted {args.hf_model} ({len(names)} tensors, {n / 1e6:.2f}M parameters) -> "
          f"{save / checkpoint.tag_of(0)} at TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
          f" x EP {p.expert_model_parallel_size}")
    if padded > rows:
        print(f"note: the vocabulary was padded from {rows} to {padded} rows (zero) for TP {p.tensor_model_parallel_size}")
    spm = Path(args.hf_model) / "tokenizer.model"  # an export ships its sentencepiece model
    tok = f" --tokenizer-type SentencePieceTokenizer --tokenizer-model {spm}" if spm.exists() else ""
    print(f"fine-tune with: moc-train --config RECIPE.yaml --config {save / MODEL_YAML} --load {save} --finetune{tok} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
