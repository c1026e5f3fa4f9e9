"""DeepSpeed checkpoints, written atomically and resumed exactly.

Layout of --save DIR:
    DIR/iter_0000100/   DeepSpeed's model + optimizer files, client state (iteration, consumed samples,
                        scheduler), rng_rank00000.pt per rank, moc_checkpoint.json (resolved config and
                        layout), config.yaml (for people)
    DIR/latest          the tag of the newest complete checkpoint

A checkpoint is written under iter_N.tmp, renamed to iter_N when every rank has finished, and only then
named in ``latest``; a run killed mid-save leaves ``latest`` on the previous good one (and a .tmp
directory that the next save removes). --keep-last K deletes all but the newest K afterwards.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import yaml

from moc_megatron.config import Config
from moc_megatron.errors import UserError
from moc_megatron.training.bank_io import local_banks, save_banks, writes_bank

TAG = re.compile(r"^iter_(\d{7})$")
META = "moc_checkpoint.json"


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save(engine, scheduler, cfg: Config, ctx, iteration: int, consumed_samples: int, origin: str | None = None) -> str:
    """Write DIR/iter_N atomically and point ``latest`` at it. Every rank must call this.
    ``origin`` (recorded in moc_checkpoint.json) names where weights came from when not from training."""
    root, tag = cfg.training.save, tag_of(iteration)
    tmp = f"{tag}.tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, tmp), ignore_errors=True)
    _barrier()
    client = {"iteration": iteration, "consumed_samples": consumed_samples, "scheduler": scheduler.state_dict()}
    engine.save_checkpoint(root, tag=tmp, client_state=client, save_latest=False)
    torch.save(rng_state(), os.path.join(root, tmp, f"rng_rank{_rank():05d}.pt"))
    save_bank_shards(getattr(engine, "module", None), ctx, os.path.join(root, tmp))
    bank_optimizer = getattr(engine, "moc_bank_optimizer", None)
    if bank_optimizer is not None:
        torch.save(bank_optimizer.state_dict(), os.path.join(root, tmp, f"bank_optim_rank{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        _write_meta(os.path.join(root, tmp), cfg, ctx, iteration, origin)
        _publish(root, tmp, tag)
        prune(root, cfg.training.keep_last)
    _barrier()
    return os.path.join(root, tag)


def save_bank_shards(module, ctx, path: str) -> None:
    """Banks by global chapter id (bank_io): DeepSpeed keeps only one chapter-parallel rank's shard."""
    if module is None:
        return
    banks = {j: b for j, b in local_banks(module).items() if writes_bank(module, ctx, j)}
    if banks:
        save_banks(banks, path, write_shared=ctx.ep_rank == 0)


def _publish(root: str, tmp: str, tag: str) -> None:
    final = os.path.join(root, tag)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(os.path.join(root, tmp), final)
    atomic_write(os.path.join(root, "latest"), tag)


def atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _write_meta(path: str, cfg: Config, ctx, iteration: int, origin: str | None = None) -> None:
    meta = {"iteration": iteration, "config": cfg.to_dict(),
            "layout": {"dp_size": ctx.dp_size, "tp_size": ctx.tp_size, "pp_size": ctx.pp_size,
                       "ep_size": ctx.ep_size, "zero_stage": cfg.training.zero_stage}}
    if origin is not None:
        meta["origin"] = origin
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    tags = sorted(d for d in os.listdir(root) if TAG.match(d) and os.path.isdir(os.path.join(root, d)))
    for old in tags[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def latest_tag(root: str) -> str:
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        raise UserError(f"--load {root}: no 'latest' file there; point --load at a directory written by --save")
    tag = open(path).read().strip()
    if not os.path.isdir(os.path.join(root, tag)):
        raise UserError(f"--load {root}: 'latest' names {tag}, which does not exist")
    return tag


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
