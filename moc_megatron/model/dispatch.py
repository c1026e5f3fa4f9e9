"""Chapter-parallel memory read (SPEC 2.1): work goes to the chapters, as MoE sends tokens to experts.

Each rank of the expert-parallel (EP) group owns a contiguous slice of the routed chapters; shared
chapters live on every rank. For every (routing unit, owner) pair with selected chapters on that
owner, the unit's memory queries travel to the owner with the ids and weights of those chapters
only, so the attention work summed over the owners is EP=1's. The owner projects K/V once for the
unique chapters it received and runs the same chapter-attention op as the local read, which returns
the partial output and its log-sum-exp; those come back and the requester merges them exactly, in
fp32:  lse = logsumexp_r lse_r,  out = sum_r exp(lse_r - lse) out_r.

Three collectives per memory layer forward (counts, request, reply) and one host read of the split
sizes; the request and the reply each pack several tensors into one all-to-all.

Letters: U local units, p pairs, c queries per unit, h/kv heads, e head dim, k routed chapters per
unit, m slots per pair on the wire (k), n slots per pair at the owner, t tokens per chapter,
u unique chapters.
"""

from __future__ import annotations

import math

import torch

from moc_megatron.ops import unique_chapters, used_rows


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Variable-split all-to-all over dim 0 through deepspeed.comm."""
    import deepspeed.comm as dscomm

    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dscomm.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits,
                             input_split_sizes=in_splits, group=group)
    return out


def _pack(tensors) -> torch.Tensor:
    """Tensors with a common leading dim (p, ...) -> (p, bytes) uint8, each row's bytes side by side."""
    return torch.cat([t.contiguous().view(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8) for t in tensors],
                     dim=1)


def _unpack(packed: torch.Tensor, likes) -> list[torch.Tensor]:
    """Inverse of _pack for tensors with the trailing dims and dtypes of ``likes``; p = packed rows."""
    widths = [math.prod(t.shape[1:]) * t.element_size() for t in likes]
    parts = packed.split(widths, dim=1)
    return [part.clone(memory_format=torch.contiguous_format).view(t.dtype).view(packed.shape[0], *t.shape[1:])
            for part, t in zip(parts, likes)]


class PackedAllToAll(torch.autograd.Function):
    """Several tensors split alike over dim 0 in ONE variable-split all-to-all (bytes packed per row).

    Backward sends the floating tensors' gradients back the way the data came, again packed."""

    @staticmethod
    def forward(ctx, out_splits: list[int], in_splits: list[int], group, *tensors):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        ctx.floating = [t.is_floating_point() for t in tensors]
        ctx.likes = [t[:0] for t in tensors]
        received = _unpack(all_to_all(_pack(tensors), out_splits, in_splits, group), tensors)
        ctx.mark_non_differentiable(*[r for r, f in zip(received, ctx.floating) if not f])
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        out_splits, in_splits = ctx.splits
        floats = [like.new_zeros((sum(out_splits), *like.shape[1:])) if g is None else g
                  for g, like, f in zip(grads, ctx.likes, ctx.floating) if f]
        sent = _unpack(all_to_all(_pack(floats), in_splits, out_splits, ctx.group),
                       [like for like, f in zip(ctx.likes, ctx.floating) if f])
        back = iter(sent)
        return (None, None, None, *[next(back) if f else None for f in ctx.floating])


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ChapterParallelRead:
    """The memory read of one MemoryRead module when chapters are sharded over an EP group."""

    def __init__(self, read, ep_group, ep_size: int):
        self.read, self.group, self.ep_size = read, ep_group, ep_size
        self.bytes_sent = self.bytes_received = 0

    def __call__(self, q, bank, chapters, weights, active):
        # q: (U, c, h, e) queries of the local routing units; chapters, weights: (U, n); active: (U,)
        ns = bank.n_shared
        parts = []
        if ns:  # every unit reads every shared chapter: no lookup, the table is the shared bank
            shared = torch.arange(ns, device=q.device)
            out, lse = self.read.attend(q, lambda: bank.shared_rows(shared), chapters[:, :ns], weights[:, :ns], None)
            parts.append((torch.arange(q.shape[0], device=q.device), out, lse))
        parts.append(self._routed_part(q, bank, chapters[:, ns:], weights[:, ns:], active))
        return merge_partials(q.shape[0], parts).to(q.dtype)

    def _routed_part(self, q, bank, routed, w, active):
        # routed, w: (U, k) global ids and weights of the routed chapters
        unit_idx, ids, wts, per_pair = self._requests(routed, w, active, bank)
        send, send_max = (per_pair > 0).sum(0), per_pair.amax(0)              # (ep,) pairs and largest slot count
        counts = torch.stack([send, send_max])                                # (2, ep)
        recv_counts = all_to_all(counts.T.contiguous(), [1] * self.ep_size, [1] * self.ep_size, self.group)
        sizes = torch.cat([send, recv_counts.reshape(-1)]).tolist()           # the one host read
        send_l, recv_l = sizes[: self.ep_size], sizes[self.ep_size :][0::2]
        n = max(sizes[self.ep_size :][1::2], default=0)                      # slots per pair at the owner
        q_out = q[unit_idx]
        q_in, w_in, ids_in = PackedAllToAll.apply(recv_l, send_l, self.group, q_out, wts, ids)
        out, lse = self._own_read(q_in, bank, ids_in[:, :n], w_in[:, :n])
        out_back, lse_back = PackedAllToAll.apply(send_l, recv_l, self.group, out, lse)
        self._count(sent=(counts, q_out, wts, ids, out, lse),
                    received=(recv_counts, q_in, w_in, ids_in, out_back, lse_back))
        return unit_idx, out_back, lse_back

    def _requests(self, routed, w, active, bank):
        """(unit, owner) pairs with routed slots on that owner, grouped by owner, and each pair's slots:
        unit_idx (p,), ids (p, k) global ids (-1 past the pair's count), weights (p, k), and the slot
        count of every (unit, owner) (U, ep), zero for units that do not route."""
        U, k = routed.shape
        owner = (routed - bank.n_shared) // bank.routed.shape[0]              # (U, k)
        order = owner.argsort(dim=1, stable=True)                            # a pair's slots side by side
        owner, routed, w = owner.gather(1, order), routed.gather(1, order), w.gather(1, order)
        per_pair = torch.zeros(U, self.ep_size, dtype=torch.int64, device=routed.device)
        per_pair.scatter_add_(1, owner, torch.ones_like(owner))
        per_pair *= active[:, None]
        dest, unit_idx = torch.nonzero(per_pair.T, as_tuple=True)            # sorted by owner, then unit
        count = per_pair[unit_idx, dest]                                     # (p,)
        start = (per_pair.cumsum(1) - per_pair)[unit_idx, dest]              # first sorted slot of the pair
        slot = torch.arange(k, device=routed.device)
        real = slot[None] < count[:, None]                                   # (p, k)
        pos = (start[:, None] + slot[None]).clamp(max=k - 1)
        ids = torch.where(real, routed[unit_idx[:, None], pos], -1)
        wts = torch.where(real, w[unit_idx[:, None], pos], 0.0)
        return unit_idx, ids, wts, per_pair

    def _own_read(self, q, bank, ids, w):
        """The owner's partial read: q (p, c, h, e), ids, w (p, n) with -1 marking empty slots."""
        used = ids >= 0
        local = torch.where(used, ids - bank.first_routed, 0)               # empty slots name row 0, unused
        unique, inverse = unique_chapters(local)
        hit = used_rows(unique.shape[0], inverse, used) if bank.sparse_grad else None
        return self.read.attend(q, lambda: bank.routed_rows(unique, hit), inverse, w, used)

    def _count(self, sent, received):
        self.bytes_sent += _nbytes(*sent)
        self.bytes_received += _nbytes(*received)


def merge_partials(units: int, parts):
    """Exact merge, in fp32, of partial attentions of the same queries over disjoint key sets.

    parts: list of (unit_idx (p,), out (p, c, h, e), lse (p, c, h)). Returns (units, c, h, e) fp32.
    A partial over no keys (lse -inf) has weight 0."""
    unit_idx = torch.cat([p[0] for p in parts])
    out = torch.cat([p[1].float() for p in parts])
    lse = torch.cat([p[2].float() for p in parts])
    c, h, e = out.shape[1:]
    peak = torch.full((units, c, h), float("-inf"), dtype=lse.dtype, device=lse.device)
    peak = peak.scatter_reduce(0, unit_idx[:, None, None].expand_as(lse), lse.detach(), "amax")
    peak = torch.where(torch.isinf(peak), 0.0, peak)                       # a unit that read nothing
    scaled = (lse - peak[unit_idx]).exp()                                  # stabilised by the unit's max
    total = torch.zeros(units, c, h, dtype=lse.dtype, device=lse.device).index_add(0, unit_idx, scaled)
    share = scaled / total[unit_idx].clamp(min=1e-30)
    merged = torch.zeros(units, c, h, e, dtype=out.dtype, device=out.device)
    return merged.index_add(0, unit_idx, out * share[..., None])
