"""Checkpoints, written atomically, resumed exactly and at any layout.

Layout of --save DIR:
    DIR/iter_0000100/   model/ and optim/: weights and optimizer states by single-process name and
                        global shape (torch.distributed.checkpoint; dist_state.py), rng_rank00000.pt per
                        rank, moc_checkpoint.json (resolved config, the layout that saved it, and the
                        training state: iteration, consumed samples, LR schedule), config.yaml (for people)
    DIR/latest          the tag of the newest complete checkpoint

Checkpoints of earlier versions (DeepSpeed's mp_rank_* / zero_pp_rank_* files and bank/, no "format" in
moc_checkpoint.json) still load, at the layout that wrote them (resume.py).

A checkpoint is written under iter_N.tmp, flushed to disk, renamed to iter_N when every rank has
finished, and only then named in ``latest``; a run killed (even by SIGKILL) at any moment of a save
leaves ``latest`` naming a complete checkpoint, and leftovers (.tmp, .old, .del) that the next save
removes. Saving over an iter_N that ``latest`` names moves the old one to iter_N.old first, which
latest_tag() reads until the new one is in place. --keep-last K deletes all but the newest K afterwards,
never the one ``latest`` names.

Test hook: MOC_TEST_PAUSE_IN_SAVE=<point>[@<iteration>] makes the save write the file
$MOC_TEST_PAUSE_MARKER (default DIR/.paused-<point>) at that point and sleep, to be killed there
(tests/test_crash_safe_save.py). Points, in order: model, optimizer, meta, latest, prune.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import yaml

from moc_megatron.config import Config
from moc_megatron.errors import UserError

TAG = re.compile(r"^iter_(\d{7})$")
LEFTOVER = re.compile(r"^iter_\d{7}\.(tmp|old|del)$")
META = "moc_checkpoint.json"
FORMAT = "dcp-1"  # model/ and optim/ by torch.distributed.checkpoint; without it: DeepSpeed's files (same layout only)
PAUSE_POINTS = ("model", "optimizer", "meta", "latest", "prune")


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save(engine, scheduler, cfg: Config, ctx, iteration: int, consumed_samples: int, origin: str | None = None) -> str:
    """Write DIR/iter_N atomically and point ``latest`` at it. Every rank must call this.
    ``origin`` (recorded in moc_checkpoint.json) names where weights came from when not from training."""
    root, tag = cfg.training.save, tag_of(iteration)
    tmp = f"{tag}.tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        remove_leftovers(root)
    _barrier()
    os.makedirs(os.path.join(root, tmp), exist_ok=True)
    train_state = {"iteration": iteration, "consumed_samples": consumed_samples, "scheduler": scheduler.state_dict()}
    write_state(engine, cfg, ctx, os.path.join(root, tmp), pause=lambda point: _pause(point, root, iteration))
    _pause("optimizer", root, iteration)
    torch.save(rng_state(), os.path.join(root, tmp, f"rng_rank{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        _write_meta(os.path.join(root, tmp), cfg, ctx, train_state, origin)
        _sync_tree(os.path.join(root, tmp))
        _pause("meta", root, iteration)
        _publish(root, tmp, tag, iteration)
        _pause("prune", root, iteration)
        prune(root, cfg.training.keep_last)
    _barrier()
    return os.path.join(root, tag)


def _publish(root: str, tmp: str, tag: str, iteration: int) -> None:
    """Rename tmp to tag, then name it in ``latest``; each step leaves latest_tag() a complete checkpoint."""
    final, aside = os.path.join(root, tag), os.path.join(root, f"{tag}.old")
    if os.path.exists(final):  # a re-save of this iteration: keep the old one readable until the new is in place
        os.rename(final, aside)
    os.rename(os.path.join(root, tmp), final)
    _sync_dir(root)
    _pause("latest", root, iteration)
    atomic_write(os.path.join(root, "latest"), tag)
    _remove(aside)


def remove_leftovers(root: str) -> None:
    """Clear what interrupted saves left: remove iter_N.tmp and iter_N.del; put an iter_N.old back as
    iter_N when the save that moved it aside died before renaming the new one in (else remove it)."""
    for name in sorted(os.listdir(root)):
        m = LEFTOVER.match(name)
        if m and m[1] == "old" and not os.path.exists(os.path.join(root, name[:-4])):
            os.rename(os.path.join(root, name), os.path.join(root, name[:-4]))
        elif m:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    _sync_dir(os.path.dirname(os.path.abspath(path)))


def _sync_tree(path: str) -> None:
    """fsync every file under path, then the directories, so a rename never publishes unwritten data
    (a killed process loses nothing the kernel has; a crashed node loses what it had not flushed)."""
    for folder, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(folder)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    """Delete a directory by first renaming it out of the checkpoint names (a kill mid-delete leaves iter_N.del)."""
    if not os.path.exists(path):
        return
    doomed = re.sub(r"(\.old)?$", ".del", path, count=1)
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _write_meta(path: str, cfg: Config, ctx, train_state: dict, origin: str | None = None) -> None:
    meta = {"format": FORMAT, "iteration": train_state["iteration"], "train_state": train_state,
            "config": cfg.to_dict(), "layout": layout_of(cfg, ctx)}
    if origin is not None:
        meta["origin"] = origin
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def layout_of(cfg: Config, ctx) -> dict:
    return {"dp_size": ctx.dp_size, "tp_size": ctx.tp_size, "pp_size": ctx.pp_size, "ep_size": ctx.ep_size,
            "zero_stage": cfg.training.zero_stage}


def write_state(engine, cfg: Config, ctx, path: str, pause) -> None:
    """The weights and optimizer states, layout-free (dist_state); a seam the save tests replace."""
    from moc_megatron.training import dist_state

    dist_state.save(engine, cfg, ctx, path, pause)


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    current = _read_latest(root)
    tags = sorted(d for d in os.listdir(root) if TAG.match(d) and os.path.isdir(os.path.join(root, d)))
    for old in tags[:-keep_last]:
        if old != current:
            _remove(os.path.join(root, old))


def latest_tag(root: str) -> str:
    """The tag ``latest`` names: iter_N, or iter_N.old while a re-save of iteration N is being published."""
    tag = _read_latest(root)
    if tag is None:
        raise UserError(f"--load {root}: no 'latest' file there; point --load at a directory written by --save")
    if not os.path.isdir(os.path.join(root, tag)) and os.path.isfile(os.path.join(root, f"{tag}.old", META)):
        return f"{tag}.old"
    if not os.path.isdir(os.path.join(root, tag)):
        raise UserError(f"--load {root}: 'latest' names {tag}, which does not exist")
    return tag


def _read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


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


def _pause(point: str, root: str, iteration: int) -> None:
    """Test hook (see the module docstring): mark, then sleep until killed."""
    want = os.environ.get("MOC_TEST_PAUSE_IN_SAVE")
    if not want:
        return
    name, _, at = want.partition("@")
    if name != point or (at and int(at) != iteration):
        return
    marker = os.environ.get("MOC_TEST_PAUSE_MARKER") or os.path.join(root, f".paused-{point}")
    with open(f"{marker}.rank{_rank()}", "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(1)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
