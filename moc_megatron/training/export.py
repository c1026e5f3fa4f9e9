"""Merge a checkpoint of any TP x PP x EP layout into one state dict, and export it to Hugging Face.

    moc-convert-hf --checkpoint runs/ckpt --output hf/moc-tiny [--iteration N] [--tokenizer-model M]
                   [--dtype bf16|fp16|fp32] [--verify]

Checkpoints store the weights at their global shapes (dist_state), read here whole. Checkpoints of
the earlier DeepSpeed format are merged: TP slices concatenated on their partition dimension, pipeline
layer files renamed by the pipeline's spec layout, bank chapters placed by global chapter id (bank_io).
Runs on CPU with no distributed launch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from moc_megatron.errors import UserError
from moc_megatron.training.bank_io import has_bank_files, read_full_bank
from moc_megatron.training import dist_state
from moc_megatron.training.checkpoint import FORMAT, META

# Column-parallel weights split the output dimension (0), row-parallel the input (1).
TP_DIM = {"embed_tokens.weight": 0, "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0,
          "gate_proj.weight": 0, "up_proj.weight": 0, "o_proj.weight": 1, "down_proj.weight": 1}


def resolve_tag(root: str, iteration: int | None) -> str:
    if not os.path.isdir(root):
        raise UserError(f"--checkpoint {root}: no such directory")
    if iteration is not None:
        tag = f"iter_{iteration:07d}"
    else:
        latest = os.path.join(root, "latest")
        if not os.path.exists(latest):
            raise UserError(f"--checkpoint {root}: no 'latest' file; name one with --iteration")
        tag = open(latest).read().strip()
    path = os.path.join(root, tag)
    if not os.path.exists(os.path.join(path, META)):
        raise UserError(f"{path}: not a complete moc-megatron checkpoint (no {META})")
    return path


def merged_state_dict(path: str) -> tuple[dict, dict]:
    """(config dict, full single-process state dict) of the checkpoint at ``path``."""
    meta = json.load(open(os.path.join(path, META)))
    if meta.get("format") == FORMAT:
        return meta["config"], dist_state.read_full(os.path.join(path, dist_state.MODEL))
    cfg, layout = meta["config"], meta["layout"]
    tp = layout["tp_size"]
    shards = [_stage_files(path, cfg, rank, layout["pp_size"]) for rank in range(tp)]
    state = {k: _merge_tp(k, [s[k] for s in shards]) for k in shards[0]}
    mem = cfg["memory"]
    n_banks = 0 if not mem["layers"] else (1 if mem["bank_sharing"] == "global" else len(mem["layers"]))
    for j in range(n_banks):
        if has_bank_files(path):
            full = read_full_bank(path, j, mem["chapters"], mem["shared_chapters"])
            state[f"banks.{j}.routed"] = full[mem["shared_chapters"]:]
            if mem["shared_chapters"]:
                state[f"banks.{j}.shared"] = full[: mem["shared_chapters"]]
        elif f"banks.{j}.routed" not in state:
            raise UserError(f"{path}: bank {j} is neither in the model files nor in bank/")
    return cfg, state


def _stage_files(path: str, cfg: dict, tp_rank: int, pp: int) -> dict:
    """One TP rank's parameters under single-process names."""
    if pp == 1:
        f = os.path.join(path, f"mp_rank_{tp_rank:02d}_model_states.pt")
        module = _load(f)["module"]
        return {k: v for k, v in module.items() if not k.endswith("_extra_state") and "marker" not in k}
    from moc_megatron.config import from_dict
    from moc_megatron.model.pipeline import spec_layout

    out = {}
    for idx, name in enumerate(spec_layout(from_dict(cfg).resolve())):
        f = os.path.join(path, f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt")
        if name in ("head",) or name.startswith("banks."):
            continue  # tied to the embedding / written to bank/
        prefix = {"embed": "", "norm": "norm."}.get(name, name + ".")
        for k, v in _load(f).items():
            if not k.endswith("_extra_state"):
                out[prefix + k] = v
    return out


def _merge_tp(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    dim = tp_dim(key)
    return parts[0] if dim is None else torch.cat(parts, dim=dim)


def tp_dim(key: str) -> int | None:
    """The dimension a tensor-parallel weight is split on; None for weights every TP rank holds whole."""
    return next((d for suffix, d in TP_DIM.items() if key.endswith(suffix)), None)


def _load(f: str):
    if not os.path.exists(f):
        raise UserError(f"{f} is missing: the checkpoint is incomplete or of another layout")
    return torch.load(f, map_location="cpu", weights_only=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moc-convert-hf", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="the --save directory of a training run")
    p.add_argument("--iteration", type=int, default=None, help="default: the one named in 'latest'")
    p.add_argument("--output", required=True, help="directory to write (replaced atomically)")
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece .model to ship with the export")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--verify", action="store_true",
                   help="score a random batch with the merged training model and the export; fail above 1e-4")
    args = p.parse_args(argv)
    try:
        path = resolve_tag(args.checkpoint, args.iteration)
        cfg, state = merged_state_dict(path)
        from moc_megatron.hf import save_hf

        out = save_hf(state, cfg, args.output, tokenizer_model=args.tokenizer_model, dtype=args.dtype)
        n = sum(v.numel() for v in state.values())
        print(f"merged {path} ({_layout(path)}): {len(state)} tensors, {n / 1e6:.2f}M parameters -> {out}")
        if args.verify:
            from moc_megatron.training.verify import verify_export

            verify_export(cfg, state, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _layout(path: str) -> str:
    lay = json.load(open(os.path.join(path, META)))["layout"]
    return " x ".join(f"{k[:-5].upper()} {lay[k]}" for k in ("tp_size", "pp_size", "ep_size", "dp_size"))


if __name__ == "__main__":
    sys.exit(main())
