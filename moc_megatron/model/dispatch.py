"""Chapter-parallel memory read (SPEC 2.1): work goes to the chapters, as MoE sends tokens to experts.

Each rank of the expert-parallel (EP) group owns a contiguous slice of the routed chapters; shared
chapters live on every rank. For every (routing unit, owner) pair with selected chapters on that
owner, the unit's memory queries travel to the owner in one all-to-all (counts exchanged first,
variable splits, nothing dropped). The owner projects K/V once for the unique chapters it received,
computes the partial attention and its log-sum-exp, and a second all-to-all brings them back. The
requester merges the partials exactly:  lse = logsumexp_r lse_r,  out = sum_r exp(lse_r - lse) out_r.

Letters: p pairs, c queries per unit, h/kv heads, e head dim, k routed chapters per unit, t tokens
per chapter, u unique chapters.
"""

from __future__ import annotations

import torch

from moc_megatron.ops import chapter_gather, unique_chapters


class AllToAll(torch.autograd.Function):
    """Variable-split all-to-all over dim 0; backward sends gradients back the way data came."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    import deepspeed.comm as dscomm

    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dscomm.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits,
                             input_split_sizes=in_splits, group=group)
    return out


def attend(q, k, v, key_mask):
    """Partial attention with its log-sum-exp. q (p, c, h, e); k, v (p, m, kv, e); key_mask (p, m)."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("pche,pmhe->phcm", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = scores.logsumexp(-1)                                            # (p, h, c)
    out = torch.einsum("phcm,pmhe->pche", (scores - lse[..., None]).exp(), v)
    return out, lse.transpose(1, 2)                                       # (p, c, h, e), (p, c, h)


class ChapterParallelRead:
    """The memory read of one MemoryRead module when chapters are sharded over an EP group."""

    def __init__(self, read, ep_group, ep_size: int):
        self.read, self.group, self.ep_size = read, ep_group, ep_size
        self.bytes_sent = self.bytes_received = 0

    def __call__(self, q, bank, chapters, weights, active):
        # q: (U, c, h, e) queries of the local routing units; chapters, weights: (U, n); active: (U,)
        ns = bank.n_shared
        parts = []
        if ns:
            k, v = self._keys(bank.shared_rows, chapters[:, :ns], weights[:, :ns])
            out, lse = attend(q, k, v, torch.ones(k.shape[:2], dtype=torch.bool, device=q.device))
            parts.append((torch.arange(q.shape[0], device=q.device), out, lse))
        parts.append(self._routed_part(q, bank, chapters[:, ns:], weights[:, ns:], active))
        return merge_partials(q.shape[0], parts)

    def _routed_part(self, q, bank, routed, w, active):
        # routed, w: (U, k) global ids and weights of the routed chapters
        per_rank = bank.routed.shape[0]
        owner = (routed - bank.n_shared) // per_rank
        unit_idx, dest = self._pairs(owner, active)                           # (p,), (p,) sorted by dest
        mine = owner[unit_idx] == dest[:, None]                               # (p, k) slots of that owner
        send = torch.bincount(dest, minlength=self.ep_size).tolist()
        recv = all_to_all(torch.tensor(send, device=q.device), [1] * self.ep_size, [1] * self.ep_size,
                          self.group).tolist()
        q_out, ids_out, w_out = q[unit_idx], torch.where(mine, routed[unit_idx], -1), w[unit_idx] * mine
        q_in = AllToAll.apply(q_out, recv, send, self.group)
        ids_in = all_to_all(ids_out, recv, send, self.group)
        w_in = AllToAll.apply(w_out, recv, send, self.group)
        valid = ids_in >= 0
        local = torch.where(valid, ids_in - bank.first_routed, 0)             # padding reads row 0, masked
        k, v = self._keys(bank.routed_rows, local, w_in, valid)
        out, lse = attend(q_in, k, v, valid.repeat_interleave(bank.routed.shape[1], dim=1))
        out_back = AllToAll.apply(out, send, recv, self.group)
        lse_back = AllToAll.apply(lse, send, recv, self.group)
        self._count(sent=(q_out, ids_out, w_out, out, lse), received=(q_in, ids_in, w_in, out_back, lse_back))
        return unit_idx, out_back, lse_back

    def _pairs(self, owner, active):
        """(unit, owner rank) pairs that have at least one selected chapter, grouped by owner."""
        has = torch.zeros(owner.shape[0], self.ep_size, dtype=torch.bool, device=owner.device)
        has.scatter_(1, owner, True)
        has &= active[:, None]
        dest, unit_idx = torch.nonzero(has.T, as_tuple=True)                 # sorted by dest, then unit
        return unit_idx, dest

    def _keys(self, lookup, rows, w, valid=None):
        """Weighted K/V for rows (p, n) of a local chapter table, read through a MemoryBank row reader
        (shared_rows / routed_rows); valid (p, n) marks real slots: (p, n*t, kv, e) each."""
        p, n = rows.shape
        unique, inverse = unique_chapters(rows)
        if valid is None:
            x = lookup(unique)
        else:  # rows that only padding slots read stay out of a sparse bank gradient
            used = torch.zeros(unique.shape[0], dtype=torch.bool, device=rows.device)
            used[inverse[valid]] = True
            x = lookup(unique, used)
        k_u, v_u = self.read.project_rows(x)
        w, t = w.to(k_u.dtype), x.shape[1]
        k = chapter_gather(k_u, inverse, w).view(p, n * t, self.read.kv_local, self.read.e)
        v = chapter_gather(v_u, inverse, w).view(p, n * t, self.read.kv_local, self.read.e)
        return k, v

    def _count(self, sent, received):
        self.bytes_sent += sum(t.numel() * t.element_size() for t in sent)
        self.bytes_received += sum(t.numel() * t.element_size() for t in received)


def merge_partials(units: int, parts):
    """Exact merge of partial attentions of the same queries over disjoint key sets.

    parts: list of (unit_idx (p,), out (p, c, h, e), lse (p, c, h)). Returns (units, c, h, e)."""
    unit_idx = torch.cat([p[0] for p in parts])
    out = torch.cat([p[1] for p in parts])
    lse = torch.cat([p[2] for p in parts])
    c, h, e = out.shape[1:]
    peak = torch.full((units, c, h), float("-inf"), dtype=lse.dtype, device=lse.device)
    peak = peak.scatter_reduce(0, unit_idx[:, None, None].expand_as(lse), lse.detach(), "amax")
    scaled = (lse - peak[unit_idx]).exp()                                  # stabilised by the unit's max
    total = torch.zeros(units, c, h, dtype=lse.dtype, device=lse.device).index_add(0, unit_idx, scaled)
    merged = torch.zeros(units, c, h, e, dtype=out.dtype, device=out.device)
    merged = merged.index_add(0, unit_idx, out * (scaled / total[unit_idx])[..., None])
    return merged
