"""--load: resume exactly (weights, optimizer, schedule, data position, RNG) or, with --finetune, take
the weights only. A checkpoint that does not fit the run is refused with the settings that differ."""

from __future__ import annotations

import json
import os

import torch

from moc_megatron.config import Config, flag_name
from moc_megatron.errors import UserError
from moc_megatron.training.bank_io import has_bank_files, load_banks, local_banks
from moc_megatron.training.checkpoint import META, latest_tag, set_rng_state
from moc_megatron.training.optim import apply_group_settings

# Settings that shape the parameters (or their sharding): the weights cannot load without them.
WEIGHT_FIELDS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "vocab_size"),
    "memory": ("layers", "tokens", "chapters", "num_heads", "num_kv_heads", "bank_sharing"),
    "parallel": ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"),
}
# Resuming also continues the same function, optimizer groups and data stream.
RESUME_FIELDS = {
    "model": ("rotary_base", "norm_epsilon"),
    "memory": ("shared_chapters", "top_k", "routed_scaling_factor", "normalize_before_mixing", "pooling",
               "rolling_window", "routing_unit", "routing_chunk", "first_chunk"),
    "training": ("seq_length", "seed", "data_path", "split", "mock_data", "chat_data", "tokenizer_type",
                 "tokenizer_model", "freeze_memory_bank", "memory_bank_optimizer", "zero_stage"),
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
    tag = latest_tag(t.load)
    path = os.path.join(t.load, tag)
    meta = read_meta(path)
    if "origin" in meta and not t.finetune:
        raise UserError(f"--load {path}: converted from {meta['origin']}, not saved by a training run: there is "
                        "no training state to resume; start from its weights with --finetune")
    check_compatible(meta, cfg, ctx, path)
    if t.finetune:
        engine.load_checkpoint(t.load, tag, load_module_only=True, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
        _load_bank_shards(engine, cfg, path)
        # DeepSpeed copied the module into its fp32 master weights at load, before the bank shards
        # replaced the chapters of other chapter-parallel ranks: copy again, or the first step
        # writes chapter-parallel rank 0's chapters back over every other rank's.
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
        return 0, 0
    _, client = engine.load_checkpoint(t.load, tag, load_optimizer_states=True, load_lr_scheduler_states=False)
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
    apply_group_settings(engine.optimizer, cfg)  # this run's learning rates, not the checkpoint's
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
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"--load {path}: no {META}; not a checkpoint written by moc-megatron") from None


def check_compatible(meta: dict, cfg: Config, ctx, path: str) -> None:
    saved, now = meta["config"], cfg.to_dict()
    fields = dict(WEIGHT_FIELDS)
    if not cfg.training.finetune:
        fields = {s: WEIGHT_FIELDS.get(s, ()) + RESUME_FIELDS.get(s, ()) for s in {*WEIGHT_FIELDS, *RESUME_FIELDS}}
    diffs = [(flag_name(s, k), saved[s].get(k), now[s][k]) for s in sorted(fields) for k in fields[s]
             if saved.get(s, {}).get(k) != now[s][k]]
    layout = meta.get("layout", {})
    if not cfg.training.finetune and cfg.training.zero_stage > 0 and layout.get("dp_size", ctx.dp_size) != ctx.dp_size:
        diffs.append(("data-parallel size (ZeRO-partitioned optimizer state)", layout["dp_size"], ctx.dp_size))
    if diffs:
        shown = "; ".join(f"--{name} is {_show(old)} there and {_show(new)} here" for name, old, new in diffs)
        hint = ("use the checkpoint's settings (its config.yaml)" if cfg.training.finetune else
                "use the checkpoint's settings (its config.yaml), or --finetune to start a new run from its weights")
        raise UserError(f"--load {path}: checkpoint incompatible with this run: {shown}. To load it, {hint}")


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
