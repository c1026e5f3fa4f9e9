"""--load: resume exactly (weights, optimizer, schedule, data position, RNG) or, with --finetune, take
the weights only. A checkpoint that does not fit the run is refused with the settings that differ.

Checkpoints in the current format (dist_state: torch.distributed.checkpoint) load at any TP, PP, EP,
DP size and ZeRO stage; the log names both layouts. What cannot carry over is refused by flag: the
model's shape, the optimizer (--memory-bank-optimizer), the global batch, the routing and the data.
Checkpoints in the earlier DeepSpeed format load at the layout that wrote them."""

from __future__ import annotations

import json
import os

import torch

from moc_megatron.config import Config, flag_name
from moc_megatron.errors import UserError
from moc_megatron.training import dist_state
from moc_megatron.training.bank_io import has_bank_files, load_banks, local_banks
from moc_megatron.training.checkpoint import FORMAT, META, latest_tag, layout_of, set_rng_state
from moc_megatron.training.metrics import print0
from moc_megatron.training.optim import apply_group_settings

# Settings that shape the parameters (or their sharding): the weights cannot load without them.
WEIGHT_FIELDS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "vocab_size"),
    "memory": ("layers", "tokens", "chapters", "num_heads", "num_kv_heads", "bank_sharing"),
}
# The earlier DeepSpeed format shards files by layout: it loads at the same one only.
LAYOUT_FIELDS = {"parallel": ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                              "expert_model_parallel_size")}
# Resuming also continues the same function, optimizer groups and data stream.
RESUME_FIELDS = {
    "model": ("rotary_base", "norm_epsilon"),
    "memory": ("shared_chapters", "top_k", "routed_scaling_factor", "normalize_before_mixing", "pooling",
               "rolling_window", "routing_unit", "routing_chunk", "first_chunk"),
    "training": ("seq_length", "seed", "data_path", "split", "mock_data", "chat_data", "tokenizer_type",
                 "tokenizer_model", "freeze_memory_bank", "memory_bank_optimizer", "global_batch_size"),
}


def first_start(cfg: Config) -> bool:
    """--load names the --save directory and it holds no checkpoint yet: the first start of a job that
    requeues itself with the same flags (launch_scripts/slurm.sbatch) begins at iteration 0."""
    t = cfg.training
    return (t.load is not None and t.save is not None and not t.finetune
            and os.path.abspath(t.load) == os.path.abspath(t.save)
            and not os.path.exists(os.path.join(t.load, "latest")))


def load(engine, scheduler, cfg: Config, ctx) -> tuple[int, int]:
    """(iteration, consumed samples) to continue from; (0, 0) with --finetune."""
    t = cfg.training
    path = os.path.join(t.load, latest_tag(t.load))
    meta = read_meta(path)
    if "origin" in meta and not t.finetune:
        raise UserError(f"--load {path}: converted from {meta['origin']}, not saved by a training run: there is "
                        "no training state to resume; start from its weights with --finetune")
    check_compatible(meta, cfg, ctx, path)
    if meta.get("format") != FORMAT:
        return _load_deepspeed(engine, scheduler, cfg, path)
    old, new = meta["layout"], layout_of(cfg, ctx)
    print0(f"--load {path}: saved at {_show_layout(old)}; {'the same layout' if old == new else 'resharding to '}"
           f"{'' if old == new else _show_layout(new)}")
    dist_state.load(engine, cfg, ctx, path, weights_only=t.finetune)
    if t.finetune:
        return 0, 0
    state = meta["train_state"]
    apply_group_settings(engine.optimizer, cfg)  # this run's learning rates, not the checkpoint's
    scheduler.load_state_dict(state["scheduler"])
    engine.global_steps, engine.global_samples = state["iteration"], state["consumed_samples"]
    # The same layout: each rank its own RNG; another: rank 0's on every rank (the model draws no random
    # numbers in training, so this only matters to user code)
    rank = torch.distributed.get_rank() if old == new else 0
    set_rng_state(torch.load(_existing(path, f"rng_rank{rank:05d}.pt"), map_location="cpu", weights_only=False))
    return state["iteration"], state["consumed_samples"]


def _existing(path: str, name: str) -> str:
    f = os.path.join(path, name)
    if not os.path.exists(f):
        raise UserError(f"{f} is missing: the checkpoint is incomplete")
    return f


def _show_layout(lay: dict) -> str:
    return (f"TP {lay['tp_size']} x PP {lay['pp_size']} x EP {lay['ep_size']} x DP {lay['dp_size']}, "
            f"ZeRO {lay['zero_stage']}")


def _load_deepspeed(engine, scheduler, cfg: Config, path: str) -> tuple[int, int]:
    """A checkpoint in the earlier format: DeepSpeed's files and bank/, at the layout that wrote them."""
    t = cfg.training
    root, tag = os.path.split(path)
    if t.finetune:
        engine.load_checkpoint(root, tag, load_module_only=True, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
        _load_bank_shards(engine, cfg, path)
        # DeepSpeed copied the module into its fp32 master weights at load, before the bank shards
        # replaced the chapters of other chapter-parallel ranks: copy again, or the first step
        # writes chapter-parallel rank 0's chapters back over every other rank's.
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
        return 0, 0
    _, client = engine.load_checkpoint(root, tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if client is None:
        raise UserError(f"--load {path}: DeepSpeed could not read the checkpoint")
    _load_bank_shards(engine, cfg, path)
    bank_optimizer = getattr(engine, "moc_bank_optimizer", None)
    if bank_optimizer is not None:
        f = os.path.join(path, f"bank_optim_rank{torch.distributed.get_rank():05d}.pt")
        if not os.path.exists(f):
            raise UserError(f"--load {path}: no {os.path.basename(f)}; it was not saved with --memory-bank-optimizer "
                            "sparse_adam (use --finetune to start from its weights)")
        bank_optimizer.load_state_dict(torch.load(f, map_location="cpu", weights_only=False))
    apply_group_settings(engine.optimizer, cfg)
    scheduler.load_state_dict(client["scheduler"])
    rng = os.path.join(path, f"rng_rank{torch.distributed.get_rank():05d}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))  # RNG states are CPU byte tensors
    return client["iteration"], client["consumed_samples"]


def _load_bank_shards(engine, cfg: Config, path: str) -> None:
    """This rank's chapters from bank/ (by global chapter id), over what DeepSpeed restored."""
    if has_bank_files(path):
        load_banks(local_banks(engine.module), path, cfg.memory.chapters)


def read_meta(path: str) -> dict:
    f = os.path.join(path, META)
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"--load {path}: no {META}; not a checkpoint written by moc-megatron") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: corrupted ({e}); the checkpoint cannot be read") from None
    layout = meta.get("layout") if isinstance(meta, dict) else None
    keys = ("tp_size", "pp_size", "ep_size", "dp_size", "zero_stage")
    if not isinstance(layout, dict) or not all(isinstance(layout.get(k), int) for k in keys):
        raise UserError(f"{f}: no valid 'layout' (needs integer {', '.join(keys)}); the checkpoint is corrupted")
    if meta.get("format") == FORMAT and not isinstance(meta.get("train_state"), dict):
        raise UserError(f"{f}: no 'train_state'; the checkpoint is corrupted")
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{f}: no 'config'; the checkpoint is corrupted")
    return meta


def check_compatible(meta: dict, cfg: Config, ctx, path: str) -> None:
    saved, now = meta["config"], cfg.to_dict()
    fields = dict(WEIGHT_FIELDS)
    if not cfg.training.finetune:
        fields = {s: WEIGHT_FIELDS.get(s, ()) + RESUME_FIELDS.get(s, ()) for s in {*WEIGHT_FIELDS, *RESUME_FIELDS}}
    deepspeed_format = meta.get("format") != FORMAT
    if deepspeed_format:
        fields.update(LAYOUT_FIELDS)
    diffs = [(flag_name(s, k), saved[s].get(k), now[s][k]) for s in sorted(fields) for k in fields[s]
             if saved.get(s, {}).get(k) != now[s][k]]
    layout = meta.get("layout", {})
    if deepspeed_format and not cfg.training.finetune:
        for name, key, here in (("data-parallel size (ZeRO-partitioned optimizer state)", "dp_size", ctx.dp_size),
                                ("zero-stage", "zero_stage", cfg.training.zero_stage)):
            if layout.get(key, here) != here and (key != "dp_size" or cfg.training.zero_stage > 0):
                diffs.append((name, layout[key], here))
    if diffs:
        shown = "; ".join(f"--{name} is {_show(old)} there and {_show(new)} here" for name, old, new in diffs)
        hint = ("use the checkpoint's settings (its config.yaml)" if cfg.training.finetune else
                "use the checkpoint's settings (its config.yaml), or --finetune to start a new run from its weights")
        old = " (a checkpoint of an earlier version: it loads at the layout that wrote it)" if deepspeed_format else ""
        raise UserError(f"--load {path}: checkpoint incompatible with this run{old}: {shown}. To load it, {hint}")


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
