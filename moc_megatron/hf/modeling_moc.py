"""Mixture-of-Chapters (MoC) language model for Hugging Face transformers (SPEC 1).

Standalone (torch + transformers only): export copies this file next to config.json and
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it. The math is the training
model's (moc_megatron/model), term for term:

    plain block   h = h + SelfAttn(RMSNorm_1(h));                               h = h + MLP(RMSNorm_2(h))
    memory block  h = h + SelfAttn(RMSNorm_1(h)); h = h + MemRead(RMSNorm_m(h), chapters(h_in));
                  h = h + MLP(RMSNorm_2(h))

where the router reads h_in, the residual stream entering the block.

Routing units. Sequence routing reads one chapter set per sequence, pooled over the whole sequence;
with a cache it routes on the prompt and keeps those chapters while decoding (or, with
``inference_routing="rolling"``, re-routes every step on the rolling window of recent states). Chunk
routing cuts positions into chunks of c; chunk j reads the chapters routed on the mean of the states
before it (chunk 0: its first token, or shared chapters only). A forward call may start and end anywhere
inside a chunk, so each row's tokens are laid out in "slots" (position minus the start of the chunk of the
row's first token) and processed as whole chunks; the cache carries each memory layer's running prefix
sums and the current chunk's chapters, so decoding token by token equals the full forward.

Padding. ``attention_mask`` marks valid tokens: self-attention skips padded keys, routers pool valid
positions only, and default positions (rotary phases, chunk boundaries) count valid tokens, so a row of a left- or
right-padded batch gets the scores it gets alone.

Letters: b batch, s sequence (this call), d hidden, h query heads, g key/value heads, e head dim,
c chapters in the bank, t tokens per chapter, k top-k, n = shared + k chapters per unit, u unique
chapters, G routing units in this call, w rolling window, L cached + new positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers < 4.52
    GradientCheckpointingLayer = nn.Module
try:
    from transformers import initialization as init  # leaves weights loaded by from_pretrained alone
except ImportError:  # transformers 4.x
    from torch.nn import init

from .configuration_moc import MoCConfig

# ---------------------------------------------------------------------------------------------
# Backbone: RMSNorm, rotary embeddings, GQA self-attention, SwiGLU.


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x) (* weight), computed in fp32."""
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class MoCRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms_norm(x, self.eps, self.weight)


def rotary_cos_sin(positions: torch.Tensor, e: int, base: float):
    """cos, sin (b, s, e) of positions (b, s); Llama's layout (halves rotated)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, e, 2, dtype=torch.float32, device=positions.device) / e))
    freqs = positions.float()[..., None] * inv_freq  # (b, s, e/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (b, s, h, e); cos, sin: (b, s, e)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotated * sin).to(x.dtype)


class MoCAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE; keys and values cached per layer."""

    def __init__(self, config: MoCConfig, layer_idx: int):
        super().__init__()
        d, self.e = config.hidden_size, config.head_dim
        self.h, self.g = config.num_attention_heads, config.num_key_value_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d, self.h * self.e, bias=False)
        self.k_proj = nn.Linear(d, self.g * self.e, bias=False)
        self.v_proj = nn.Linear(d, self.g * self.e, bias=False)
        self.o_proj = nn.Linear(self.h * self.e, d, bias=False)

    def forward(self, x, rope, mask, past_key_values=None):
        # x: (b, s, d); rope: cos, sin (b, s, e); mask: SelfAttnMask
        b, s, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(b, s, self.h, self.e), *rope).transpose(1, 2)  # (b, h, s, e)
        k = apply_rotary(self.k_proj(x).view(b, s, self.g, self.e), *rope).transpose(1, 2)  # (b, g, s, e)
        v = self.v_proj(x).view(b, s, self.g, self.e).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)                             # (b, g, L, e)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal,
                                             enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.h * self.e))


class MoCMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MoCConfig):
        super().__init__()
        d, d_ff = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class SelfAttnMask:
    mask: torch.Tensor | None  # (b, 1, s, L) bool, True = attend; None with is_causal or no masking
    is_causal: bool


def self_attention_mask(attention_mask: torch.Tensor | None, s: int, past: int, device) -> SelfAttnMask:
    """Causal attention over cached + new positions, padding keys masked (each query keeps itself)."""
    # attention_mask: (b, L) with 1 for tokens, 0 for padding, or None
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and past == 0:
        return SelfAttnMask(None, s > 1)
    if not padded and s == 1:
        return SelfAttnMask(None, False)
    q_idx = torch.arange(past, past + s, device=device)[:, None]
    k_idx = torch.arange(past + s, device=device)[None, :]
    allowed = (k_idx <= q_idx)[None]                                                # (1, s, L)
    if padded:
        allowed = allowed & (attention_mask.bool()[:, None, :] | (k_idx == q_idx))  # (b, s, L)
    return SelfAttnMask(allowed[:, None], False)


def default_positions(attention_mask: torch.Tensor | None, b: int, s: int, past: int, device) -> torch.Tensor:
    """Positions (b, s) of this call's tokens: without a mask past..past+s-1; with one, counted over valid
    tokens only, so a left-padded row starts at 0 (rotary phases and chunk boundaries as if it were alone),
    as generate() counts them. Padding gets 0; it is never read."""
    if attention_mask is None:
        return torch.arange(past, past + s, device=device)[None].expand(b, s)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -s:]


# ---------------------------------------------------------------------------------------------
# Memory (SPEC 1.1-1.4): bank, router, memory read, and what a cache carries between calls.


class MemoryBank(nn.Module):
    """M in R^{c x t x d}; the first n_shared chapters are shared."""

    def __init__(self, config: MoCConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.memory_chapters, config.memory_chapter_tokens,
                                               config.hidden_size))


@dataclass
class Routing:
    """The chapters each routing unit (b, G) reads."""

    chapters: torch.Tensor  # (b, G, n) long: shared chapters, then the routed top-k
    weights: torch.Tensor   # (b, G, n): mixing weights, summing to 1 per unit
    logits: torch.Tensor    # (b, G, c) fp32 router logits z
    active: torch.Tensor    # (b, G) bool: False where a unit reads shared chapters only

    def map(self, fn) -> "Routing":
        return Routing(*(fn(getattr(self, f.name)) for f in fields(self)))


class Router(nn.Module):
    """z = W_r r + b_r; shared chapters always read, top-k of the rest routed (SPEC 1.2)."""

    def __init__(self, config: MoCConfig):
        super().__init__()
        self.n_shared, self.top_k = config.memory_shared_chapters, config.memory_top_k
        self.scale = config.memory_routed_scaling_factor
        self.proj = nn.Linear(config.hidden_size, config.memory_chapters, bias=True)

    def forward(self, r: torch.Tensor, active: torch.Tensor) -> Routing:
        # r: (b, G, d) pooled states; active: (b, G)
        z = self.proj(r).float()                                           # (b, G, c)
        p = z.softmax(-1)
        routed = p[..., self.n_shared:]
        routed = routed / routed.sum(-1, keepdim=True)
        g, idx = routed.topk(self.top_k, dim=-1)                           # (b, G, k)
        g = g / g.sum(-1, keepdim=True) * self.scale
        shared = torch.arange(self.n_shared, device=r.device).expand(*idx.shape[:-1], self.n_shared)
        chapters = torch.cat([shared, idx + self.n_shared], dim=-1)
        weights = torch.cat([torch.ones_like(g[..., :1]).expand(*g.shape[:-1], self.n_shared),
                             g * active[..., None]], dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return Routing(chapters, weights.to(r.dtype), z, active)


class MemoryRead(nn.Module):
    """softmax(Q K^T / sqrt(e)) V W_O over the chapters a unit selected; no causal mask (SPEC 1.3)."""

    def __init__(self, config: MoCConfig):
        super().__init__()
        d, self.h, self.g = config.hidden_size, config.memory_num_heads, config.memory_num_kv_heads
        self.e = d // self.h
        self.eps, self.normalize = config.rms_norm_eps, config.memory_normalize_before_mixing
        self.n_shared, self.n = config.memory_shared_chapters, config.memory_shared_chapters + config.memory_top_k
        self.q_proj = nn.Linear(d, self.h * self.e, bias=False)
        self.k_proj = nn.Linear(d, self.g * self.e, bias=False)
        self.v_proj = nn.Linear(d, self.g * self.e, bias=False)
        self.o_proj = nn.Linear(self.h * self.e, d, bias=False)  # zero at init: the branch starts as identity

    def keys_values(self, bank: torch.Tensor, chapters: torch.Tensor, weights: torch.Tensor):
        """K = w * (norm(m) W_K), V likewise, projected once per unique chapter: (m, n*t, g, e) each."""
        # bank: (c, t, d); chapters, weights: (m, n)
        m, n = chapters.shape
        unique, inverse = chapters.unique(return_inverse=True)
        x = bank.index_select(0, unique)                                   # (u, t, d)
        if self.normalize:
            x = rms_norm(x, self.eps)
        k_u, v_u = self.k_proj(x), self.v_proj(x)                          # (u, t, g*e)
        w = weights[..., None, None]
        k = (k_u[inverse] * w).view(m, n * bank.shape[1], self.g, self.e)
        v = (v_u[inverse] * w).view(m, n * bank.shape[1], self.g, self.e)
        return k, v

    def forward(self, x, k, v, active):
        # x: (m, l, d) queries of m units; k, v: (m, n*t, g, e); active: (m,)
        m, l, _ = x.shape
        q = self.q_proj(x).view(m, l, self.h, self.e)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=self.key_mask(active, k.shape[1]), enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(m, l, self.h * self.e))

    def key_mask(self, active: torch.Tensor, keys: int):
        """Units that route to nothing read only their shared chapters' keys: (m, 1, 1, n*t) or None."""
        if bool(active.all()):
            return None
        shared_keys = torch.arange(keys, device=active.device) < keys // self.n * self.n_shared
        return (active[:, None] | shared_keys[None, :])[:, None, None, :]


@dataclass
class MemoryState:
    """What one memory layer carries from one forward call to the next, per row."""

    k: torch.Tensor                  # (b, n*t, g, e) weighted keys of the current unit's chapters
    v: torch.Tensor                  # (b, n*t, g, e)
    routing: Routing                 # of the current unit, (b, 1, ...)
    unit: torch.Tensor               # (b,) long: index of the current unit (chunk routing)
    sums: torch.Tensor | None        # (b, d) sum of the router's valid input states so far (chunk routing)
    counts: torch.Tensor | None      # (b,)
    tail: torch.Tensor | None        # (b, w-1, d) last w-1 raw router inputs (rolling windows)
    tail_valid: torch.Tensor | None  # (b, w-1)

    def map(self, fn) -> "MemoryState":
        """Apply a batch-dimension map (beam reorder, repeat, select) to every tensor."""
        new = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in new.items():
            if isinstance(value, Routing):
                new[name] = value.map(fn)
            elif value is not None:
                new[name] = fn(value)
        return MemoryState(**new)


class MoCCache(DynamicCache):
    """Self-attention keys/values (DynamicCache) plus each memory layer's routing state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory: dict[int, MemoryState] = {}

    def _map_memory(self, fn):
        self.memory = {i: state.map(fn) for i, state in self.memory.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_memory(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_memory(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_memory(lambda x: x.repeat_interleave(repeats, dim=0))

    def reset(self):
        super().reset()
        self.memory = {}

    def crop(self, tokens_to_remove: int) -> None:
        if self.memory and tokens_to_remove > 0:
            raise NotImplementedError("MoCCache cannot roll back routing prefix sums; assisted decoding "
                                      "and other cache-cropping generation modes are not supported")
        super().crop(tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        return not self.memory and super().is_croppable


# ---------------------------------------------------------------------------------------------
# Pooling: the router's input per routing unit, from the residual stream entering the block.


def rolling_means(h: torch.Tensor, mask: torch.Tensor, w: int) -> torch.Tensor:
    """Causal rolling-window means: position i averages the valid states in (i - w, i]."""
    # h: (b, s, d); mask: (b, s) float
    sums = (h * mask[..., None]).cumsum(1)
    counts = mask.cumsum(1)
    sums = sums - F.pad(sums, (0, 0, w, 0))[:, : h.shape[1]]
    counts = counts - F.pad(counts, (w, 0))[:, : h.shape[1]]
    return sums / counts.clamp(min=1)[..., None]


def with_tail(h_in, valid, state: MemoryState | None, w: int):
    """The last w-1 positions before this call (zeros without a cache) followed by this call's."""
    # h_in: (b, s, d), valid: (b, s) -> (b, w-1+s, d), (b, w-1+s)
    if state is None or state.tail is None:
        tail = h_in.new_zeros(h_in.shape[0], w - 1, h_in.shape[2])
        tail_valid = valid.new_zeros(valid.shape[0], w - 1)
    else:
        tail, tail_valid = state.tail, state.tail_valid
    return torch.cat([tail, h_in], 1), torch.cat([tail_valid, valid], 1)


def router_states(h_in, valid, state, config: MoCConfig) -> torch.Tensor:
    """What the router pools: the states, or their causal rolling-window means (pooling "rolling")."""
    if config.memory_pooling != "rolling":
        return h_in
    w = config.memory_rolling_window
    h, mask = with_tail(h_in, valid, state, w)
    return rolling_means(h, mask.to(h.dtype), w)[:, w - 1:]


def next_tail(h_in, valid, state, w: int):
    """The last w-1 masked raw states after this call, for the next call's rolling windows."""
    h, mask = with_tail(h_in * valid[..., None].to(h_in.dtype), valid, state, w)
    return h[:, h.shape[1] - (w - 1):], mask[:, mask.shape[1] - (w - 1):]


# ---------------------------------------------------------------------------------------------
# The memory branch: router + RMSNorm_m + memory read, with sequence or chunk routing units.


class MemoryBranch(nn.Module):
    def __init__(self, config: MoCConfig):
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.memory_layernorm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.memory_attn = MemoryRead(config)

    @property
    def keeps_tail(self) -> bool:
        """Whether the cache must carry the last w-1 states (rolling pooling or rolling re-routing)."""
        if self.config.memory_routing_unit == "chunk":
            return self.config.memory_pooling == "rolling"
        return self.config.inference_routing == "rolling"

    def forward(self, h, h_in, bank, positions, valid, state: MemoryState | None):
        # h: (b, s, d) after self-attention; h_in: (b, s, d) entering the block; positions, valid: (b, s)
        x = self.memory_layernorm(h)
        if self.config.memory_routing_unit == "sequence":
            out, routing, new_state = self.sequence_units(x, h_in, bank, valid, state)
        else:
            out, routing, new_state = self.chunk_units(x, h_in, bank, positions, valid, state)
        if new_state is not None and self.keeps_tail:
            new_state.tail, new_state.tail_valid = next_tail(h_in, valid, state, self.config.memory_rolling_window)
        return out, routing, new_state

    # ---- sequence routing: one unit per sequence ----

    def sequence_units(self, x, h_in, bank, valid, state):
        b = x.shape[0]
        if state is None:  # the whole input (the prompt): pool over valid positions, as in training
            mask = valid.to(h_in.dtype)
            states = router_states(h_in, valid, None, self.config)
            r = (states * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]      # (b, d)
            routing = self.router(r[:, None], torch.ones(b, 1, dtype=torch.bool, device=x.device))
            k, v = self.memory_attn.keys_values(bank, routing.chapters[:, 0], routing.weights[:, 0])
        elif self.config.inference_routing == "rolling":  # re-route on the last w states
            w = self.config.memory_rolling_window
            hh, mm = with_tail(h_in, valid, state, w)
            r = rolling_means(hh, mm.to(hh.dtype), w)[:, -1]                                # (b, d)
            routing = self.router(r[:, None], torch.ones(b, 1, dtype=torch.bool, device=x.device))
            k, v = self.memory_attn.keys_values(bank, routing.chapters[:, 0], routing.weights[:, 0])
        else:  # keep the prompt's chapters
            routing, k, v = state.routing, state.k, state.v
        out = self.memory_attn(x, k, v, routing.active[:, 0])
        unit = torch.zeros(b, dtype=torch.long, device=x.device)
        return out, routing, MemoryState(k, v, routing, unit, None, None, None, None)

    # ---- chunk routing: units of c positions, routed on what precedes them ----

    def chunk_units(self, x, h_in, bank, positions, valid, state):
        c, (b, s, d) = self.config.memory_routing_chunk, x.shape
        slots = Slots(positions, valid, c)
        mask = valid[..., None].to(h_in.dtype)                                                # (b, s, 1)
        states = router_states(h_in, valid, state, self.config) * mask
        r, active, sums, counts = self.unit_inputs(slots.scatter(states), slots.scatter(mask), slots, state)
        routing = self.router(r, active)                                                      # (b, G, ...)
        cont = slots.continuing(state)                                                        # (b,)
        if bool(cont.any()):  # the chunk of this call's first token began in an earlier call
            routing = merge_first_unit(routing, state.routing, cont)
        k, v = self.unit_keys_values(bank, routing, state, cont)                              # (b, G, n*t, g, e)
        q = slots.scatter(x)[:, : slots.G * c].reshape(b * slots.G, c, d)
        out = self.memory_attn(q, k.flatten(0, 1), v.flatten(0, 1), routing.active.reshape(-1))
        out = slots.gather(out.view(b, slots.G * c, d))
        last = slots.last_unit                                                                # (b,)
        new_state = MemoryState(unit_at(k, last), unit_at(v, last),
                                routing.map(lambda t: unit_at(t, last)[:, None]),
                                slots.first_unit + last, sums, counts, None, None)
        return out, routing, new_state

    def unit_inputs(self, states, mask, slots: "Slots", state):
        """Router input and activity per unit (b, G, d), (b, G); running sums and counts after this call."""
        c, G = self.config.memory_routing_chunk, slots.G
        csum = states[:, : G * c].cumsum(1)                                                   # (b, G*c, d)
        ccount = mask[:, : G * c, 0].cumsum(1)                                                # (b, G*c)
        before = F.pad(csum[:, c - 1 :: c][:, :-1], (0, 0, 1, 0))                             # (b, G, d)
        n_before = F.pad(ccount[:, c - 1 :: c][:, :-1], (1, 0))                                # (b, G)
        if state is not None:
            before, n_before = before + state.sums[:, None], n_before + state.counts[:, None]
        r = before / n_before.clamp(min=1)[..., None]
        starts = slots.first_unit == 0  # rows whose first unit is chunk 0: it routes on its first token
        r = torch.cat([torch.where(starts[:, None], states[:, 0], r[:, 0])[:, None], r[:, 1:]], 1)
        active = torch.ones(r.shape[:2], dtype=torch.bool, device=r.device)
        if self.config.memory_first_chunk == "shared_only":
            active[:, 0] = ~starts
        total, n_total = csum[:, -1], ccount[:, -1]
        if state is not None:
            total, n_total = total + state.sums, n_total + state.counts
        return r, active, total, n_total

    def unit_keys_values(self, bank, routing: Routing, state, cont):
        """Weighted K/V of every unit; a continuing first unit reuses the cached ones."""
        b, G, n = routing.chapters.shape
        if G == 1 and bool(cont.all()):  # decoding inside the current chunk
            return state.k[:, None], state.v[:, None]
        fresh = torch.ones(b, G, dtype=torch.bool, device=cont.device)
        fresh[:, 0] = ~cont
        k, v = self.memory_attn.keys_values(bank, routing.chapters[fresh], routing.weights[fresh])
        if bool(fresh.all()):
            return k.view(b, G, *k.shape[1:]), v.view(b, G, *v.shape[1:])
        k_all, v_all = k.new_empty(b, G, *k.shape[1:]), v.new_empty(b, G, *v.shape[1:])
        k_all[fresh], v_all[fresh] = k, v
        k_all[cont, 0], v_all[cont, 0] = state.k[cont], state.v[cont]
        return k_all, v_all


def unit_at(t: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Row b's unit unit[b] of t (b, G, ...) -> (b, ...)."""
    return t[:, 0] if t.shape[1] == 1 else t[torch.arange(t.shape[0], device=t.device), unit]


def merge_first_unit(routing: Routing, cached: Routing, cont: torch.Tensor) -> Routing:
    """The first unit of continuing rows keeps the routing cached when its chunk began."""
    def merge(new, old):
        new = new.clone()
        new[cont, :1] = old[cont].to(new.dtype)
        return new
    return Routing(*(merge(getattr(routing, f.name), getattr(cached, f.name)) for f in fields(routing)))


class Slots:
    """Where each token of a call sits among whole chunks: slot = position - start of the chunk of the
    row's first valid token. Padding goes to one extra slot past the last chunk, read back as zeros."""

    def __init__(self, positions: torch.Tensor, valid: torch.Tensor, c: int):
        # positions, valid: (b, s)
        big = torch.iinfo(positions.dtype).max
        first = positions.masked_fill(~valid, big).min(1).values
        first = torch.where(first == big, torch.zeros_like(first), first)           # rows of padding only
        self.c, self.first_unit = c, first // c                                         # (b,)
        slot = positions - (self.first_unit * c)[:, None]
        last = slot.masked_fill(~valid, 0).max(1).values                                # (b,)
        self.G = int(last.max()) // c + 1
        self.last_unit = last // c
        self.slot = torch.where(valid, slot, torch.full_like(slot, self.G * c))         # (b, s)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, f) by column -> (b, G*c + 1, f) by slot (zeros where no token)."""
        out = x.new_zeros(x.shape[0], self.G * self.c + 1, x.shape[2])
        return out.scatter(1, self.slot[..., None].expand(-1, -1, x.shape[2]), x)

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """(b, G*c, f) by slot -> (b, s, f) by column (padding reads zeros)."""
        y = F.pad(y, (0, 0, 0, 1))
        return y.gather(1, self.slot[..., None].expand(-1, -1, y.shape[2]))

    def continuing(self, state: MemoryState | None) -> torch.Tensor:
        """(b,) rows whose first unit was started (and routed) by an earlier call."""
        if state is None:
            return torch.zeros_like(self.first_unit, dtype=torch.bool)
        return state.unit == self.first_unit


# ---------------------------------------------------------------------------------------------
# Auxiliary router losses (SPEC 1.4), per memory layer; the model averages them over layers.


def router_losses(routing: Routing, config: MoCConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Load balance and z-loss over the routing units that routed."""
    n_shared, k, c = config.memory_shared_chapters, config.memory_top_k, config.memory_chapters
    act = routing.active.reshape(-1)
    z = routing.logits.reshape(-1, c)[act]                                           # (units, c)
    probs = z.softmax(-1)
    routed_ids = routing.chapters.reshape(-1, n_shared + k)[act, n_shared:]
    counts = torch.bincount(routed_ids.reshape(-1), minlength=c)[n_shared:].to(probs.dtype)
    units = max(probs.shape[0], 1)
    if config.memory_load_balance_form == "normalized":
        P_sum = (probs[:, n_shared:] / probs[:, n_shared:].sum(-1, keepdim=True)).sum(0)
        f_scale = 1.0 / max(k, 1)
    else:  # the authors' form: P over all chapters (shared included), f per unit; minimum k
        P_sum, f_scale = probs[:, n_shared:].sum(0), 1.0
    load_balance = (c - n_shared) * (counts * f_scale / units * (P_sum / units)).sum()
    z_loss = torch.logsumexp(z, -1).pow(2).mean() if z.numel() else z.sum()
    return load_balance, z_loss


# ---------------------------------------------------------------------------------------------
# Blocks and models.


class MoCDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoCConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoCAttention(config, layer_idx)
        self.memory = MemoryBranch(config) if layer_idx in config.memory_layers else None
        self.post_attention_layernorm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoCMLP(config)

    def forward(self, h, bank=None, rope=None, mask=None, positions=None, valid=None, past_key_values=None):
        # h: (b, s, d) -> (b, s, d), and a memory block's routing tensors (chapters, weights, logits, active)
        h_in = h
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, past_key_values)
        routing = None
        if self.memory is not None:
            state = past_key_values.memory.get(self.layer_idx) if past_key_values is not None else None
            out, routing, new_state = self.memory(h, h_in, bank, positions, valid, state)
            if past_key_values is not None:
                past_key_values.memory[self.layer_idx] = new_state
            h = h + out
        h = h + self.mlp(self.post_attention_layernorm(h))
        if routing is None:
            return h, None, None, None, None
        return h, routing.chapters, routing.weights, routing.logits, routing.active


class MoCPreTrainedModel(PreTrainedModel):
    config_class = MoCConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoCDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        """As the training model initialises: normal(std) projections, zero router bias and memory W_O."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoCRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MemoryBank):
            init.normal_(module.weight, mean=0.0, std=self.config.memory_bank_init_std)
        if isinstance(module, MemoryRead):
            init.zeros_(module.o_proj.weight)


class MoCModel(MoCPreTrainedModel):
    def __init__(self, config: MoCConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoCDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.banks = nn.ModuleList(MemoryBank(config) for _ in range(config.num_banks))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        # input_ids, attention_mask (b, past + s), position_ids: (b, s)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("MoC models take a 2D attention_mask (batch, past + new tokens) of 1s and 0s")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = h.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        past_key_values = self.memory_cache(past_key_values) if use_cache else None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.shape[1] != past + s:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; it must cover the {past} cached "
                             f"and {s} new tokens ({past + s})")
        if position_ids is None:
            position_ids = default_positions(attention_mask, b, s, past, h.device)
        position_ids = position_ids.expand(b, s)
        valid = (attention_mask[:, -s:].bool() if attention_mask is not None
                 else torch.ones(b, s, dtype=torch.bool, device=h.device))
        mask = self_attention_mask(attention_mask, s, past, h.device)
        rope = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        routings = []
        for layer in self.layers:
            bank = self.banks[self.config.bank_index(layer.layer_idx)].weight if layer.memory is not None else None
            h, *routing = layer(h, bank, rope=rope, mask=mask, positions=position_ids, valid=valid,
                                past_key_values=past_key_values)
            if layer.memory is not None:
                routings.append(Routing(*routing))
        return MoCModelOutput(last_hidden_state=self.norm(h), past_key_values=past_key_values, routings=routings)

    def memory_cache(self, cache):
        """The cache to fill: a MoCCache (an empty DynamicCache, as generate() makes, is replaced)."""
        if isinstance(cache, MoCCache):
            return cache
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("MoC models need a MoCCache (it holds the memory routing state); got a filled "
                             f"{type(cache).__name__}")
        return MoCCache(config=self.config)


@dataclass
class MoCModelOutput(BaseModelOutputWithPast):
    routings: list | None = None


@dataclass
class MoCCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Adds, per memory layer, what the router did, and the averaged auxiliary losses."""

    load_balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple | None = None    # per memory layer (b, G, c)
    router_chapters: tuple | None = None  # per memory layer (b, G, n): shared chapters, then the routed top-k
    router_weights: tuple | None = None   # per memory layer (b, G, n)


class MoCForCausalLM(MoCPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoCConfig):
        super().__init__(config)
        self.model = MoCModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_router_logits=False,
                logits_to_keep=0, **kwargs):
        """labels: (b, s) as input_ids (shifted inside, -100 ignored). In training mode the loss adds the
        router losses weighted as in training: lm + lb_coeff * load_balance + z_coeff * z_loss."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        lb, zl = self.aux_losses(out.routings)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if self.training and lb is not None:
                loss = loss + self.config.memory_load_balance_coeff * lb + self.config.memory_z_loss_coeff * zl
        router = {}
        if output_router_logits:
            router = {"router_logits": tuple(r.logits for r in out.routings),
                      "router_chapters": tuple(r.chapters for r in out.routings),
                      "router_weights": tuple(r.weights for r in out.routings)}
        return MoCCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                         load_balance_loss=lb, z_loss=zl, **router)

    def aux_losses(self, routings):
        """Load balance and z-loss averaged over memory layers (None without memory)."""
        if not routings:
            return None, None
        per_layer = [router_losses(r, self.config) for r in routings]
        return (torch.stack([lb for lb, _ in per_layer]).mean(), torch.stack([z for _, z in per_layer]).mean())
