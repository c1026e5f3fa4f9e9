"""The MoC language model: embedding, blocks (some with a memory branch), final norm, tied head.

A plain block is   h = h + SelfAttn(RMSNorm_1(h));                          h = h + MLP(RMSNorm_2(h))
A memory block is  h = h + SelfAttn(RMSNorm_1(h)); h = h + MemRead(RMSNorm_m(h), chapters(h_in));
                   h = h + MLP(RMSNorm_2(h))
where the router reads h_in, the residual stream entering the block. Which blocks have memory, and
which bank they read, is configuration (SPEC 1).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from megatron.core import tensor_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint

from moc_megatron.config import Config
from moc_megatron.model.layers import RMSNorm, SelfAttention, SwiGLU, normal_init
from moc_megatron.model.memory import (MemoryBank, MemoryRead, Router, Routing, pool_units, router_losses,
                                       router_stats)
from moc_megatron.parallel.state import ParallelContext


@contextmanager
def seeded(seed: int, key: str):
    """Initialise a module from (seed, key) alone, so weights do not depend on which modules a rank
    builds (pipeline stages, chapter shards) or in what order."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        yield


class MemoryBranch(nn.Module):
    """Router + RMSNorm_m + memory read: the third residual branch of a memory block."""

    def __init__(self, ctx: ParallelContext, cfg: Config):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.router = Router(cfg)
        self.memory_layernorm = RMSNorm(cfg.model.hidden_size, cfg.model.norm_epsilon)
        self.memory_attn = MemoryRead(ctx, cfg)
        for p in self.parameters():
            p.moc_group = "memory_layers"

    def forward(self, h: torch.Tensor, h_in: torch.Tensor, bank: MemoryBank, valid):
        routing = self.router(*pool_units(h_in, valid, self.cfg))
        out = self.memory_attn(self.memory_layernorm(h), bank, routing)
        return out, routing


class Block(nn.Module):
    def __init__(self, ctx: ParallelContext, cfg: Config, layer_idx: int):
        super().__init__()
        with seeded(cfg.training.seed, f"layers.{layer_idx}"):
            self._build(ctx, cfg, layer_idx)

    def _build(self, ctx: ParallelContext, cfg: Config, layer_idx: int):
        m = cfg.model
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.self_attn = SelfAttention(ctx, m.hidden_size, m.num_attention_heads, m.num_query_groups,
                                       m.rotary_base, m.init_method_std)
        self.memory = None
        if layer_idx in cfg.memory.layers:
            with seeded(cfg.training.seed, f"layers.{layer_idx}.memory"):  # backbone init as in vanilla
                self.memory = MemoryBranch(ctx, cfg)
        self.post_attention_layernorm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.mlp = SwiGLU(ctx, m.hidden_size, m.ffn_hidden_size, m.init_method_std)

    def forward(self, h: torch.Tensor, bank: MemoryBank | None = None, valid=None):
        # h: (b, s, d) -> (b, s, d), and the routing of a memory block (else None)
        h_in = h
        h = h + self.self_attn(self.input_layernorm(h))
        routing = None
        if self.memory is not None:
            out, routing = self.memory(h, h_in, bank, valid)
            h = h + out
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, routing


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None                 # lm_loss + lb_coeff * load_balance + z_coeff * z_loss
    lm_loss: torch.Tensor | None = None
    load_balance_loss: torch.Tensor | None = None    # averaged over memory layers
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None               # (b, s, vocab / tp) when no labels were given
    routings: list[Routing] = field(default_factory=list)
    router_stats: list[dict] = field(default_factory=list)


class MoCModel(nn.Module):
    """Decoder-only MoC transformer (vanilla when cfg.memory.layers is empty)."""

    def __init__(self, cfg: Config, ctx: ParallelContext):
        super().__init__()
        cfg.resolve()
        self.cfg, self.ctx = cfg, ctx
        m = cfg.model
        self.vocab_size = padded_vocab_size(m.vocab_size, ctx.tp_size)
        self.embed_tokens = build_embedding(cfg, ctx)
        self.layers = nn.ModuleList(Block(ctx, cfg, i) for i in range(m.num_layers))
        self.norm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.banks = nn.ModuleList(SeededBank(cfg, ctx, j) for j in range(cfg.num_banks))

    def bank_for(self, layer_idx: int) -> MemoryBank | None:
        j = bank_index(self.cfg, layer_idx)
        return None if j is None else self.banks[j]

    def forward(self, tokens, labels=None, loss_mask=None, valid=None) -> ModelOutput:
        # tokens, labels, loss_mask, valid: (b, s)
        # valid marks real tokens of a RIGHT-padded batch: routers pool over them only. Self-attention
        # and positions count columns, so a left-padded row does not score as it does alone (the HF
        # model, which takes attention_mask, handles both).
        h = self.embed_tokens(tokens)
        routings = []
        for block in self.layers:
            h, routing = self._run_block(block, h, valid)
            if routing is not None:
                routings.append(routing)
        logits = tied_logits(self.norm(h), self.embed_tokens.weight, self.ctx)  # (b, s, vocab / tp)
        out = ModelOutput(routings=routings, router_stats=[router_stats(r, self.cfg) for r in routings])
        self._add_router_losses(out)
        if labels is None:
            out.logits = logits
            return out
        out.lm_loss = lm_loss(logits, labels, loss_mask)
        out.loss = out.lm_loss + self._aux_weighted(out)
        return out

    def _run_block(self, block: Block, h, valid):
        bank = self.bank_for(block.layer_idx)
        if self.cfg.model.recompute_activations and self.training:
            return checkpoint(block, h, bank, valid, use_reentrant=False)
        return block(h, bank, valid)

    def _add_router_losses(self, out: ModelOutput) -> None:
        if not out.routings:
            return
        per_layer = [router_losses(r, self.cfg, self.ctx.dp_group) for r in out.routings]
        out.load_balance_loss = torch.stack([p["load_balance_loss"] for p in per_layer]).mean()
        out.z_loss = torch.stack([p["z_loss"] for p in per_layer]).mean()

    def _aux_weighted(self, out: ModelOutput):
        if out.load_balance_loss is None:
            return 0.0
        mem = self.cfg.memory
        return mem.load_balance_coeff * out.load_balance_loss + mem.z_loss_coeff * out.z_loss


def bank_index(cfg: Config, layer_idx: int) -> int | None:
    """Which bank a layer reads: the global one, its own, or none (a plain block)."""
    if layer_idx not in cfg.memory.layers:
        return None
    return 0 if cfg.memory.bank_sharing == "global" else cfg.memory.layers.index(layer_idx)


def build_embedding(cfg: Config, ctx: ParallelContext) -> nn.Module:
    with seeded(cfg.training.seed, "embed_tokens"):
        return tensor_parallel.VocabParallelEmbedding(
            padded_vocab_size(cfg.model.vocab_size, ctx.tp_size), cfg.model.hidden_size,
            init_method=normal_init(cfg.model.init_method_std), config=ctx.megatron_config(), tp_group=ctx.tp_group)


class SeededBank(MemoryBank):
    """Bank j drawn from (seed, "banks.j"): the same values whatever the layout or stage."""

    def __init__(self, cfg: Config, ctx: ParallelContext, j: int):
        with seeded(cfg.training.seed, f"banks.{j}"):
            super().__init__(cfg, cfg.memory.bank_init_std, ctx.ep_size, ctx.ep_rank,
                             sparse_grad=cfg.training.memory_bank_optimizer == "sparse_adam")


def tied_logits(h: torch.Tensor, embedding_weight: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The output head is the embedding: (b, s, d) -> this TP rank's vocabulary slice."""
    h = tensor_parallel.copy_to_tensor_model_parallel_region(h, group=ctx.tp_group)
    return torch.nn.functional.linear(h, embedding_weight)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask=None) -> torch.Tensor:
    """Mean cross-entropy over the positions the mask keeps (vocab-parallel)."""
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)  # (b, s)
    mask = torch.ones_like(losses) if loss_mask is None else loss_mask.float()
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def padded_vocab_size(vocab: int, tp: int) -> int:
    """Megatron pads the vocabulary so each TP rank holds an equal slice."""
    return -(-vocab // tp) * tp


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named parameters split into the three optimizer groups: backbone, memory_layers, bank.
    Groups are tags set where the parameters are made, so pipeline stages group the same way."""
    groups: dict[str, list] = {"backbone": [], "memory_layers": [], "bank": []}
    for name, p in model.named_parameters():
        groups[getattr(p, "moc_group", "backbone")].append((name, p))
    return groups
