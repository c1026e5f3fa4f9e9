"""--load at another layout: save at TP=2 x EP=2 on 4 ranks, resume at 1 process, EP=2 x DP=4, PP=2 and
TP=2 (with other ZeRO stages on the way), and EP=2 -> 1 -> 2 with sparse_adam.

After resuming, every step's loss and gradient norm follows the run that never stopped (1e-5 relative),
and the optimizer moments, read back from every rank through DeepSpeed's own accessors and merged here
by tensor-parallel slice and chapter id, equal the ones at the save bitwise. fp32, AdamW (its step
depends on the gradient's scale only through the moments, which are compared exactly).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from moc_megatron.config import load_config
from moc_megatron.errors import UserError
from multiproc import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 3  # save after N steps; the resumed runs take N more


def _cfg(tp=1, pp=1, ep=1, zero=1, save=None, load=None, iters=2 * N, save_interval=0, bank="adamw", bf16=False):
    return load_config(os.path.join(ROOT, "configs/train/moc-tiny.yaml"),
                       model={"num_layers": 2},
                       memory={"layers": [0, 1], "aux_loss_dp_average": False},
                       parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                 "expert_model_parallel_size": ep},
                       training={"seq_length": 32, "micro_batch_size": 1, "global_batch_size": 4,
                                 "train_iters": iters, "lr_decay_iters": 3 * N, "lr_warmup_iters": 1,
                                 "lr_decay_style": "cosine", "eval_interval": 0, "log_interval": 1,
                                 "zero_stage": zero, "mock_data": True, "seed": 5, "save": save, "load": load,
                                 "save_interval": save_interval, "memory_bank_optimizer": bank, "bf16": bf16})


def _optimizer_state(run) -> dict:
    """name -> (placement, {key: tensor}) of this rank's optimizer states, read through DeepSpeed's
    accessors (ZeRO) or torch's AdamW state (ZeRO 0) and RowSparseAdam's, not through dist_state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from moc_megatron.training.dist_state import Placement, global_parameters

    engine, ctx = run.engine, run.ctx
    base = engine.optimizer
    while hasattr(base, "optimizer"):
        base = base.optimizer
    bank = run.bank_optimizer.optimizer.state if run.bank_optimizer is not None else {}
    wrapper = engine.optimizer  # FP16_UnfusedOptimizer (bf16 under ZeRO 0 here): an fp32 copy per weight
    copies = {id(lp): hp for lps, hps in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", []))
              for lp, hp in zip(lps, hps)}
    place, out = Placement(ctx), {}
    for name, p in global_parameters(engine.module, run.cfg):
        if hasattr(p, "_hp_mapping"):
            state = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            if p.dtype != torch.float32:
                state["master"] = safe_get_full_fp32_param(p)
        elif id(p) in copies:
            hp = copies[id(p)]
            state = {"master": hp, **{k: base.state[hp][k] for k in ("exp_avg", "exp_avg_sq")}}
        elif p in base.state:
            state = {k: base.state[p][k] for k in ("exp_avg", "exp_avg_sq")}
        elif p in bank:
            state = {k: v for k, v in bank[p].items() if k != "step"}
        else:
            continue
        where = place.of(name, p)
        shard = None if where is None else (where[1], torch.distributed.get_rank(where[0]))
        out[name] = (shard, {k: v.detach().cpu().clone() for k, v in state.items()})
    return out


def _history(run) -> list[tuple[float, float]]:
    return [(r.loss, r.grad_norm) for r in run.history]


def _straight(rank, world_size, layout, root, iters, save_interval, bank, bf16=False):
    """The run that never stops; saves every save_interval steps, recording the optimizer state then."""
    from moc_megatron.training import checkpoint
    from moc_megatron.training.trainer import train

    at_save, real = {}, checkpoint.save

    def save_and_record(engine, scheduler, cfg, ctx, iteration, consumed, origin=None):
        path = real(engine, scheduler, cfg, ctx, iteration, consumed, origin)
        at_save[iteration] = _optimizer_state(run_ref[0])
        return path

    run_ref = []
    checkpoint.save = save_and_record
    from moc_megatron.training import trainer

    build = trainer.build
    trainer.build = lambda cfg, started=None: run_ref.append(build(cfg, started)) or run_ref[-1]
    try:
        run = train(_cfg(**layout, save=root, iters=iters, save_interval=save_interval, bank=bank, bf16=bf16))
    finally:
        checkpoint.save, trainer.build = real, build
    return {"history": _history(run), "state": at_save}


def _resumed(rank, world_size, layout, load, iters, bank, save=None, bf16=False):
    from moc_megatron.training.trainer import build, loop

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run = build(_cfg(**layout, load=load, iters=iters, bank=bank, save=save, bf16=bf16))
    state = _optimizer_state(run)
    from moc_megatron.training.dist_state import global_parameters

    weights = {n: p.detach().cpu().clone() for n, p in global_parameters(run.engine.module, run.cfg)}
    try:
        loop(run)
    finally:
        run.exits.close()
        run.reporter.close()
    return {"start": run.start_iteration, "history": _history(run), "state": state, "weights": weights,
            "log": log.getvalue()}


def _merge(per_rank: list[dict]) -> dict:
    """Whole tensors from every rank's (placement, state): slices ordered by their group rank."""
    out = {}
    for name in sorted({n for r in per_rank for n in r}):
        pieces = {}
        for r in per_rank:
            if name in r:
                shard, state = r[name]
                pieces.setdefault(None if shard is None else shard[1], (shard, state))
        if None in pieces:
            out[name] = pieces[None][1]
            continue
        dim = next(iter(pieces.values()))[0][0]
        keys = next(iter(pieces.values()))[1]
        out[name] = {k: torch.cat([pieces[i][1][k] for i in sorted(pieces)], dim) for k in keys}
    return out


def _point_latest_at(root: str, iteration: int) -> None:
    from moc_megatron.training.checkpoint import atomic_write, tag_of

    atomic_write(os.path.join(root, "latest"), tag_of(iteration))


def _assert_follows(resumed: list, straight: list, first: int):
    assert len(resumed) >= 3
    for i, ((loss, norm), (want_loss, want_norm)) in enumerate(zip(resumed, straight[first:])):
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (first + i + 1, loss, want_loss)
        assert abs(norm - want_norm) <= 1e-5 * abs(want_norm), (first + i + 1, norm, want_norm)


def _assert_same_state(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for k in want[name]:
            assert torch.equal(got[name][k], want[name][k]), (name, k)


ORIGINAL = {"tp": 2, "ep": 2, "zero": 1}  # 4 ranks: TP 2 x DP 2, chapters over 2 EP ranks
TARGETS = {  # world size, layout
    "one process": (1, {"zero": 1}),
    "EP2 x DP4, ZeRO 2": (4, {"ep": 2, "zero": 2}),
    "PP2": (2, {"pp": 2, "zero": 1}),
    "TP2": (2, {"tp": 2, "zero": 1}),
    "one process, ZeRO 0": (1, {"zero": 0}),  # the norm is ours there (optim.global_grad_norm), DeepSpeed's above
}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tp2ep2"))
    ranks = run_ranks(_straight, 4, (ORIGINAL, root, 2 * N, N, "adamw"), timeout=600)
    _point_latest_at(root, N)
    return {"root": root, "history": ranks[0]["history"], "state": _merge([r["state"][N] for r in ranks]),
            "per_rank_history": [r["history"] for r in ranks]}


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_resume_at_another_layout_follows_the_run_that_never_stopped(original, target):
    world, layout = TARGETS[target]
    ranks = run_ranks(_resumed, world, (layout, original["root"], 2 * N, "adamw"), timeout=600)
    assert all(r["start"] == N for r in ranks)
    assert "saved at TP 2 x PP 1 x EP 2 x DP 2, ZeRO 1; resharding to TP" in ranks[0]["log"], ranks[0]["log"]
    _assert_same_state(_merge([r["state"] for r in ranks]), original["state"])
    for r in ranks:  # every rank logs the same reduced loss and norm
        _assert_follows(r["history"], original["history"], N)


@pytest.mark.slow
def test_original_layout_ranks_agree(original):
    for h in original["per_rank_history"]:
        assert h == original["history"]


@pytest.mark.slow
def test_sparse_adam_bank_goes_from_ep2_to_one_process_and_back(tmp_path):
    """EP=2 (2 ranks) saves at N; one process resumes, saves at 2N; EP=2 resumes from there to 3N."""
    a, b = str(tmp_path / "ep2"), str(tmp_path / "one")
    straight = run_ranks(_straight, 2, ({"ep": 2}, a, 3 * N, N, "sparse_adam"), timeout=600)
    _point_latest_at(a, N)
    one = run_ranks(_resumed, 1, ({}, a, 2 * N, "sparse_adam", b), timeout=600)[0]
    _assert_same_state(_merge([one["state"]]), _merge([r["state"][N] for r in straight]))
    _assert_follows(one["history"], straight[0]["history"], N)
    back = run_ranks(_resumed, 2, ({"ep": 2}, b, 3 * N, "sparse_adam"), timeout=600)
    assert back[0]["start"] == 2 * N
    _assert_follows(back[0]["history"], straight[0]["history"], 2 * N)
    assert back[0]["history"] == back[1]["history"]


@pytest.mark.slow
def test_bf16_fp32_masters_and_moments_carry_over_and_the_same_layout_resumes_bitwise(tmp_path):
    """bf16 at EP=2 (ZeRO 1, fp32 masters) saved at N: one process under ZeRO 0 (DeepSpeed's
    BF16_Optimizer) gets the masters and moments bit for bit; EP=2 again continues bitwise; an fp32 run
    takes the masters as its weights."""
    root = str(tmp_path / "bf16")
    straight = run_ranks(_straight, 2, ({"ep": 2}, root, 2 * N, N, "adamw", True), timeout=600)
    _point_latest_at(root, N)
    saved = _merge([r["state"][N] for r in straight])
    assert all("master" in state for state in saved.values())
    one = run_ranks(_resumed, 1, ({"zero": 0}, root, 2 * N, "adamw", None, True), timeout=600)[0]
    _assert_same_state(_merge([one["state"]]), saved)
    for (loss, _), (want, _) in zip(one["history"], straight[0]["history"][N:]):
        assert abs(loss - want) <= 2**-7 * abs(want)  # bf16 at another layout: bf16 resolution
    again = run_ranks(_resumed, 2, ({"ep": 2}, root, 2 * N, "adamw", None, True), timeout=600)
    assert again[0]["history"] == straight[0]["history"][N:]
    # in fp32 (one process, ZeRO 1) the weights are the fp32 masters, not their bf16 rounding
    fp32 = run_ranks(_resumed, 1, ({"zero": 1}, root, 2 * N, "adamw"), timeout=600)[0]
    assert fp32["weights"].keys() == saved.keys()
    for name, state in saved.items():
        assert torch.equal(fp32["weights"][name], state["master"]), name
    _assert_same_state(_merge([fp32["state"]]),
                       {n: {k: v for k, v in s.items() if k != "master"} for n, s in saved.items()})


# ---------------------------------------------------------------------------------------------
# Checkpoints that cannot be read, and changes that cannot carry over


def _build(rank, world_size, load, overrides):
    from moc_megatron.training.trainer import build

    cfg = _cfg(load=load)
    for section, values in overrides.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    try:
        build(cfg)
    except UserError as e:
        return str(e)
    return None


def _copy(original, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(original["root"], dst)
    return dst


def _tag_dir(root: str) -> str:
    return os.path.join(root, open(os.path.join(root, "latest")).read().strip())


def _what_load_reads_first(path: str) -> None:
    """resume.load's reads before any tensor: the metadata file, then both DCP directories' .metadata."""
    from moc_megatron.training.dist_state import MODEL, OPTIM, stored_tensors
    from moc_megatron.training.resume import read_meta

    read_meta(path)
    for kind in (MODEL, OPTIM):
        stored_tensors(os.path.join(path, kind))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["no layout", "bad json", "no model metadata", "corrupt optim metadata"])
def test_damaged_checkpoint_is_refused_naming_the_file(original, tmp_path, damage):
    root = _copy(original, tmp_path)
    path = _tag_dir(root)
    meta_file = os.path.join(path, "moc_checkpoint.json")
    if damage == "no layout":
        meta = json.load(open(meta_file))
        del meta["layout"]
        json.dump(meta, open(meta_file, "w"))
        want = f"{meta_file}: no valid 'layout'"
    elif damage == "bad json":
        open(meta_file, "w").write('{"format": "dcp-1", "layout": {')
        want = f"{meta_file}: corrupted"
    elif damage == "no model metadata":
        os.remove(os.path.join(path, "model", ".metadata"))
        want = f"{os.path.join(path, 'model', '.metadata')} is missing"
    else:
        with open(os.path.join(path, "optim", ".metadata"), "r+b") as f:
            f.truncate(40)
        want = f"{os.path.join(path, 'optim', '.metadata')}: unreadable"
    with pytest.raises(UserError) as refused:
        _what_load_reads_first(path)
    assert want in str(refused.value)
    if damage == "corrupt optim metadata":  # and through --load itself, after the weights were read
        msg = run_ranks(_build, 1, (root, {}), timeout=300)[0]
        assert msg is not None and want in msg, msg


@pytest.mark.slow
@pytest.mark.parametrize("change, flag", [({"training": {"global_batch_size": 8}}, "--global-batch-size is 4 there"),
                                          ({"model": {"hidden_size": 64}}, "--hidden-size is 128 there"),
                                          ({"training": {"memory_bank_optimizer": "sparse_adam"}},
                                           "--memory-bank-optimizer is adamw there")])
def test_what_cannot_carry_over_is_refused_by_flag(original, change, flag):
    from moc_megatron.training.resume import check_compatible, read_meta

    path = _tag_dir(original["root"])
    cfg = _cfg(load=original["root"])
    for section, values in change.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    with pytest.raises(UserError, match="checkpoint incompatible with this run") as refused:
        check_compatible(read_meta(path), cfg, SimpleNamespace(dp_size=1), path)
    assert flag in str(refused.value)
    if "global_batch_size" in change.get("training", {}):  # and through --load itself
        msg = run_ranks(_build, 1, (original["root"], change), timeout=300)[0]
        assert msg is not None and flag in msg, msg


def test_stored_tensors_names_a_missing_checkpoint(tmp_path):
    from moc_megatron.training.dist_state import stored_tensors

    with pytest.raises(UserError, match=r"model/\.metadata is missing"):
        stored_tensors(str(tmp_path / "model"))


# ---------------------------------------------------------------------------------------------
# A checkpoint of the earlier DeepSpeed format (tests/data/deepspeed_format, written by c37bfa7)

OLD = os.path.join(ROOT, "tests", "data", "deepspeed_format")


def _old_run(tmp_path, nproc: int, *extra: str):
    import subprocess
    import sys

    from test_train_cli import clean_env

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(OLD, "ckpt"), ckpt)
    log = str(tmp_path / "log.jsonl")
    flags = open(os.path.join(OLD, "flags.txt")).read().split()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "moc_megatron.train",
           *flags, *extra, "--load", ckpt, "--log-jsonl", log]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    return proc, {str(r["iteration"]): r for r in rows if "loss" in r}


@pytest.mark.slow
def test_checkpoint_of_the_earlier_format_resumes_at_its_own_layout(tmp_path):
    proc, rows = _old_run(tmp_path, 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = json.load(open(os.path.join(OLD, "expected.json")))["after_resume"]
    assert sorted(rows) == sorted(expected)
    for it, want in expected.items():
        assert rows[it]["loss"] == want["loss"] and rows[it]["grad_norm"] == want["grad_norm"], it


@pytest.mark.slow
def test_checkpoint_of_the_earlier_format_at_another_layout_is_refused_by_flag(tmp_path):
    proc, _ = _old_run(tmp_path, 1, "--expert-model-parallel-size", "1")
    assert proc.returncode != 0
    assert "--expert-model-parallel-size is 2 there and 1 here" in proc.stderr and "earlier version" in proc.stderr


def test_checkpoint_of_the_earlier_format_still_exports():
    from moc_megatron.training.export import merged_state_dict

    cfg, state = merged_state_dict(os.path.join(OLD, "ckpt", "iter_0000002"))
    assert state["banks.0.routed"].shape == (8, 4, 32) and state["banks.0.shared"].shape == (1, 4, 32)
    assert state["embed_tokens.weight"].shape == (128, 32)


def test_new_checkpoints_export_the_same_names_as_the_earlier_format(original):
    """The HF export reads both; their tensor names agree (layer numbers aside: the configs differ)."""
    import re

    from moc_megatron.training.export import merged_state_dict

    _, new = merged_state_dict(_tag_dir(original["root"]))
    _, old = merged_state_dict(os.path.join(OLD, "ckpt", "iter_0000002"))
    kinds = lambda state: {re.sub(r"^layers\.\d+\.", "layers.*.", k) for k in state}  # noqa: E731
    assert kinds(new) == kinds(old)
