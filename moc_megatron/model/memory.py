"""The memory of a Mixture-of-Chapters model (SPEC 1.1-1.4): bank, router, memory read.

Letters: b batch, s sequence, d hidden, c chapters in the bank, t tokens per chapter, k top-k,
n = n_shared + k chapters read per routing unit, g routing units per sequence (1 for sequence
routing, s / chunk for chunk routing), u unique chapters in a micro-batch, h/kv memory heads, e head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from moc_megatron.config import Config
from moc_megatron.model.dispatch import ChapterParallelRead
from moc_megatron.model.layers import column_linear, linear, normal_init, rms_norm, row_linear
from moc_megatron.ops import chapter_attention, unique_chapters, used_rows
from moc_megatron.parallel.state import ParallelContext


class MemoryBank(nn.Module):
    """M in R^{c x t x d}: learned latent tokens cut into chapters; the first n_shared are shared.

    ``shared`` (n_shared, t, d) lives on every rank; ``routed`` holds this chapter-parallel rank's
    contiguous slice of the routed chapters, global ids first_routed .. first_routed + len - 1.
    The full bank is drawn from the seed and then sliced, so values do not depend on the layout.

    sparse_grad=True (``--memory-bank-optimizer sparse_adam``): reading rows gives the bank parameters
    a coalesced torch.sparse_coo gradient holding only the rows some unit read, never a dense (c, t, d)
    one; gradients of several reads (memory layers, micro-batches) add up as sparse tensors.
    Default: dense gradients, as DeepSpeed's ZeRO expects.
    """

    def __init__(self, cfg: Config, std: float, ep_size: int = 1, ep_rank: int = 0, sparse_grad: bool = False):
        super().__init__()
        mem = cfg.memory
        full = torch.empty(mem.chapters, cfg.chapter_tokens, cfg.model.hidden_size)
        nn.init.normal_(full, mean=0.0, std=std)
        per_rank = cfg.routed_chapters // ep_size
        self.n_shared, self.sparse_grad = mem.shared_chapters, sparse_grad
        self.first_routed = mem.shared_chapters + ep_rank * per_rank
        self.shared = nn.Parameter(full[: mem.shared_chapters].clone()) if mem.shared_chapters else None
        self.routed = nn.Parameter(full[self.first_routed : self.first_routed + per_rank].clone())
        for p in self.parameters():
            p.moc_group = "bank"
            if sparse_grad:  # adding two sparse gradients concatenates their rows: merge them
                p.register_post_accumulate_grad_hook(_coalesce_grad)
        if ep_size > 1:  # DeepSpeed's tags for expert parameters: reduce over expert-data-parallel ranks
            self.routed.allreduce = False
            self.routed.group_name = f"ep_size_{ep_size}"

    def rows(self, unique: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
        """Chapters by sorted unique global id (u,) -> (u, t, d). Every shared chapter is in ``unique``
        (all units read them) and sorts first; the rest must be this rank's routed chapters.
        ``used`` (u,) bool: see routed_rows."""
        ns = self.n_shared
        routed = self.routed_rows(unique[ns:] - self.first_routed, None if used is None else used[ns:])
        return routed if self.shared is None else torch.cat([self.shared_rows(unique[:ns]), routed])

    def shared_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Shared chapters by sorted unique id (u,) -> (u, t, d)."""
        return self._read(self.shared, ids, None)

    def routed_rows(self, local: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's routed chapters by sorted unique local id (u,) -> (u, t, d). ``used`` (u,) bool
        marks the rows some unit really reads; the others (padding slots, units that route to nothing)
        are masked by the caller, have zero gradient and stay out of a sparse gradient."""
        return self._read(self.routed, local, used)

    def _read(self, table: torch.Tensor, ids: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor:
        if self.sparse_grad and torch.is_grad_enabled() and table.requires_grad:
            return SparseRows.apply(table, ids, used)
        return table.index_select(0, ids)


class SparseRows(torch.autograd.Function):
    """table[ids] whose table gradient is sparse: indices ids (those ``used``), values their gradients."""

    @staticmethod
    def forward(ctx, table, ids, used):
        # table (c, t, d), ids (u,) sorted unique, used (u,) bool or None -> (u, t, d)
        ctx.table_shape = table.shape
        ctx.save_for_backward(ids, used)
        return table.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad):
        ids, used = ctx.saved_tensors
        if used is not None:
            ids, grad = ids[used], grad[used]
        # ids are sorted and unique, so the tensor is coalesced as built: no sort, no copy of the values
        sparse = torch.sparse_coo_tensor(ids[None], grad, ctx.table_shape, is_coalesced=True, check_invariants=False)
        return sparse, None, None


def _coalesce_grad(p: torch.Tensor) -> None:
    if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
        p.grad = p.grad.coalesce()


@dataclass
class Routing:
    """What the router chose for each routing unit (b, g) of a micro-batch."""

    chapters: torch.Tensor  # (b, g, n) int64: shared chapters first, then the routed top-k
    weights: torch.Tensor   # (b, g, n) fp32: mixing weights, summing to 1 per unit
    logits: torch.Tensor    # (b, g, c) router logits z
    probs: torch.Tensor     # (b, g, c) softmax(z) over all chapters
    active: torch.Tensor    # (b, g) bool: False where a unit reads shared chapters only


# ---------------------------------------------------------------------------------------------
# Pooling: one vector per routing unit, from the residual stream entering the block.


def pool_units(h: torch.Tensor, valid: torch.Tensor | None, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled router input r (b, g, d) in fp32 and which units route (b, g).

    sequence: one unit, the mean over valid positions (the paper's mode; sees the future).
    chunk:    unit j pools positions before chunk j (causal); unit 0 pools its first token or
              routes to nothing (shared chapters only).
    Pooled in fp32 whatever the hidden dtype, as MoE routers route: bf16 counts are exact only to 256.
    """
    h = h.float()
    b, s, _ = h.shape
    mask = torch.ones(b, s, device=h.device) if valid is None else valid.float()
    states = rolling_means(h, mask, cfg.memory.rolling_window) if cfg.memory.pooling == "rolling" else h
    if cfg.memory.routing_unit == "sequence":
        r = (states * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]
        return r[:, None], torch.ones(b, 1, dtype=torch.bool, device=h.device)
    c = cfg.memory.routing_chunk
    g = -(-s // c)  # chunks; the last may be shorter than c
    sums = (states * mask[..., None]).cumsum(1)[:, c - 1 :: c][:, : g - 1]  # (b, g-1, d): prefix before chunk j>0
    counts = mask.cumsum(1)[:, c - 1 :: c][:, : g - 1]
    prefix = sums / counts.clamp(min=1)[..., None]
    first = states[:, :1]  # chunk 0 routes on its first token
    active = torch.ones(b, g, dtype=torch.bool, device=h.device)
    if cfg.memory.first_chunk == "shared_only":
        active[:, 0] = False
    return torch.cat([first, prefix], dim=1), active


def rolling_means(h: torch.Tensor, mask: torch.Tensor, w: int) -> torch.Tensor:
    """Causal rolling-window means: position i averages the valid states in (i - w, i]."""
    sums = (h * mask[..., None]).cumsum(1)
    counts = mask.cumsum(1)
    sums = sums - F.pad(sums, (0, 0, w, 0))[:, : h.shape[1]]
    counts = counts - F.pad(counts, (w, 0))[:, : h.shape[1]]
    return sums / counts.clamp(min=1)[..., None]


# ---------------------------------------------------------------------------------------------
# Router (SPEC 1.2) and its losses and statistics (SPEC 1.4).


class Router(nn.Module):
    """z = W_r r + b_r over all chapters; shared chapters always read, top-k of the rest routed."""

    def __init__(self, cfg: Config):
        super().__init__()
        mem = cfg.memory
        self.n_shared, self.top_k, self.scale = mem.shared_chapters, mem.top_k, mem.routed_scaling_factor
        self.proj = nn.Linear(cfg.model.hidden_size, mem.chapters, bias=True)
        nn.init.normal_(self.proj.weight, mean=0.0, std=cfg.model.init_method_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, r: torch.Tensor, active: torch.Tensor) -> Routing:
        # r: (b, g, d) pooled states in fp32; active: (b, g)
        z = F.linear(r.float(), self.proj.weight.float(), self.proj.bias.float())   # (b, g, c), fp32 as in MoE
        # routers: a bf16 linear ties the top-k over thousands of chapters
        p = z.softmax(-1)
        routed = p[..., self.n_shared :]
        routed = routed / routed.sum(-1, keepdim=True)
        g, idx = routed.topk(self.top_k, dim=-1)                   # (b, g, k)
        g = g / g.sum(-1, keepdim=True) * self.scale
        shared = torch.arange(self.n_shared, device=r.device).expand(*idx.shape[:-1], self.n_shared)
        chapters = torch.cat([shared, idx + self.n_shared], dim=-1)
        weights = torch.cat([torch.ones_like(g[..., :1]).expand(*g.shape[:-1], self.n_shared),
                             g * active[..., None]], dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return Routing(chapters, weights, z, p, active)


def router_losses(routing: Routing, cfg: Config, dp_group=None) -> dict[str, torch.Tensor]:
    """Load balance and z-loss over the routing units that routed (SPEC 1.4).

    Units that route to nothing are weighted out rather than selected, so no step waits on the host."""
    mem, n_shared = cfg.memory, cfg.memory.shared_chapters
    act = routing.active.reshape(-1, 1).float()                             # (units, 1)
    probs = routing.probs.reshape(-1, mem.chapters)[:, n_shared:]            # (units, c_routed)
    counts = _routed_counts(routing, cfg, act)
    units = act.sum()
    if mem.load_balance_form == "normalized":
        P_sum = (probs / probs.sum(-1, keepdim=True) * act).sum(0)
        f_scale = 1.0 / max(mem.top_k, 1)
    else:  # the authors' form: P over all chapters (shared included), f per unit; minimum k
        P_sum = (probs * act).sum(0)
        f_scale = 1.0
    counts, P_sum, units = _dp_sum(counts, P_sum, units, dp_group if mem.aux_loss_dp_average else None)
    f = counts * f_scale / units.clamp(min=1)
    P = P_sum / units.clamp(min=1)
    load_balance = cfg.routed_chapters * (f * P).sum()
    lse = torch.logsumexp(routing.logits.reshape(-1, mem.chapters), -1)
    z_loss = (lse.pow(2) * act[:, 0]).sum() / act.sum().clamp(min=1)
    return {"load_balance_loss": load_balance, "z_loss": z_loss}


def _routed_counts(routing: Routing, cfg: Config, act: torch.Tensor) -> torch.Tensor:
    """(c_routed,) fp32: how many routing units (those that route) picked each routed chapter."""
    n_shared = cfg.memory.shared_chapters
    ids = routing.chapters.reshape(act.shape[0], -1)[:, n_shared:] - n_shared   # (units, k)
    ones = act.expand_as(ids).contiguous()
    return ones.new_zeros(cfg.routed_chapters).index_add_(0, ids.reshape(-1), ones.reshape(-1))


def _dp_sum(counts, P_sum, units, group):
    """Sum routing statistics over data-parallel ranks.

    Every rank then holds the global loss, and the engine averages gradients over DP, so the local
    share of P carries dp_size times its gradient: the average is the gradient of the global loss.
    """
    dp = 1 if group is None else torch.distributed.get_world_size(group)
    if dp == 1:
        return counts, P_sum, units
    stats = torch.cat([counts, P_sum.detach(), units[None]])
    torch.distributed.all_reduce(stats, group=group)
    c = counts.numel()
    return stats[:c], stats[c : 2 * c] + dp * (P_sum - P_sum.detach()), stats[-1]


@torch.no_grad()
def router_stats(routing: Routing, cfg: Config) -> dict[str, torch.Tensor]:
    """Logged, not optimised: entropy, fraction of routed chapters used, max/min load, usage counts."""
    n_shared = cfg.memory.shared_chapters
    act = routing.active.reshape(-1, 1).float()
    probs = routing.probs.reshape(-1, cfg.memory.chapters)
    routed = _routed_counts(routing, cfg, act)                               # (c_routed,)
    usage = torch.cat([routed.new_zeros(n_shared), routed]).long()          # (c,) shared entries stay 0
    load = routed / (routed.sum() / max(cfg.routed_chapters, 1)).clamp(min=1e-9)
    entropy = (-(probs * probs.clamp(min=1e-30).log()).sum(-1) * act[:, 0]).sum() / act.sum().clamp(min=1)
    return {"entropy": entropy, "chapters_used": (routed > 0).float().mean(),
            "max_load": load.max(), "min_load": load.min(), "usage": usage}


# ---------------------------------------------------------------------------------------------
# Memory read (SPEC 1.3).


class MemoryRead(nn.Module):
    """softmax(Q K^T / sqrt(e)) V W_O over the chapters each routing unit selected.

    K/V are projected once per micro-batch for the unique selected chapters (the weight is a scalar
    per chapter, so K = w * norm(m) W_K exactly) and read by chapter index by the one chapter-attention
    op, here and on the owners of a chapter-parallel read alike.
    """

    def __init__(self, ctx: ParallelContext, cfg: Config):
        super().__init__()
        d, mem = cfg.model.hidden_size, cfg.memory
        self.ctx, self.eps = ctx, cfg.model.norm_epsilon
        self.normalize = mem.normalize_before_mixing
        self.e = d // mem.num_heads
        self.h_local, self.kv_local = mem.num_heads // ctx.tp_size, mem.num_kv_heads // ctx.tp_size
        std = cfg.model.init_method_std
        self.q_proj = column_linear(ctx, d, mem.num_heads * self.e, normal_init(std))
        self.k_proj = column_linear(ctx, d, mem.num_kv_heads * self.e, normal_init(std))
        self.v_proj = column_linear(ctx, d, mem.num_kv_heads * self.e, normal_init(std))
        self.o_proj = row_linear(ctx, mem.num_heads * self.e, d, nn.init.zeros_)  # branch starts as identity
        self.n_shared = mem.shared_chapters
        self.chunk = mem.routing_chunk if mem.routing_unit == "chunk" else None
        self.recompute_kv = mem.recompute_kv
        self.chapter_parallel = ChapterParallelRead(self, ctx.ep_group, ctx.ep_size) if ctx.ep_size > 1 else None

    def forward(self, x: torch.Tensor, bank: MemoryBank, routing: Routing) -> torch.Tensor:
        # x: (b, s, d) = RMSNorm_m(h)
        b, s, _ = x.shape
        units, n = routing.chapters.shape[1], routing.chapters.shape[2]
        span = self.chunk or s                                      # positions per routing unit
        q = linear(self.q_proj, x)
        if units * span > s:  # a shorter last chunk: padded queries, their outputs dropped below
            q = F.pad(q, (0, 0, 0, units * span - s))
        q = q.view(b * units, span, self.h_local, self.e)
        w = copy_to_tensor_model_parallel_region(routing.weights.reshape(b * units, n), group=self.ctx.tp_group)
        chapters, active = routing.chapters.reshape(b * units, n), routing.active.reshape(-1)
        if self.chapter_parallel is not None:
            out = self.chapter_parallel(q, bank, chapters, w, active)
        else:
            out = self.read_local(q, bank, chapters, w, active)
        return linear(self.o_proj, out.reshape(b, units * span, self.h_local * self.e)[:, :s])

    def read_local(self, q, bank: MemoryBank, chapters, w, active) -> torch.Tensor:
        """Every selected chapter is on this rank: q (U, c, h, e), chapters, w (U, n), active (U,)."""
        used = self.used_slots(chapters, active)                   # (U, n)
        unique, inverse = unique_chapters(chapters)
        hit = used_rows(unique.shape[0], inverse, used) if bank.sparse_grad else None
        out, _ = self.attend(q, lambda: bank.rows(unique, hit), inverse, w, used)
        return out

    def attend(self, q, read_rows, index, w, used):
        """Project the chapters that read_rows() returns (u, t, d) and attend over them by index:
        the local read and the chapter-parallel owner's alike. -> out (U, c, h, e), lse (U, c, h)."""
        def project_and_attend(q, w):
            k, v = self.project_rows(read_rows())                  # (u, t, kv, e) each
            return chapter_attention(q, k, v, index, w, valid=used)

        if self.recompute_kv and torch.is_grad_enabled():  # keep the op's outputs, rebuild K/V in backward
            return checkpoint(project_and_attend, q, w, use_reentrant=False, context_fn=_keep_attention_outputs)
        return project_and_attend(q, w)

    def used_slots(self, chapters: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(U, n) bool: shared slots always, routed slots where the unit routes."""
        used = torch.ones(chapters.shape, dtype=torch.bool, device=chapters.device)
        used[:, self.n_shared :] = active[:, None]
        return used

    def project_rows(self, x: torch.Tensor):
        """Bank rows (u, t, d) -> K, V (u, t, kv, e): normalised (no gain), then projected."""
        if self.normalize:
            x = rms_norm(x, self.eps)
        u, t = x.shape[:2]
        return (linear(self.k_proj, x).view(u, t, self.kv_local, self.e),
                linear(self.v_proj, x).view(u, t, self.kv_local, self.e))


def _keep_attention_policy(ctx, op, *args, **kwargs):
    if op is torch.ops.moc_ops.chapter_attention.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_outputs():
    return create_selective_checkpoint_contexts(_keep_attention_policy)
