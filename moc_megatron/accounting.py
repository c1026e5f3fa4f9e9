"""Parameter and FLOPs accounting (SPEC 1.5, 1.6). Pure Python: reads a resolved Config, builds nothing.

FLOPs follow SPEC 1.6 literally, per sequence, batch 1, forward:
    linear 2 N d_in d_out            attention matmuls 4 L_q L_k d (d = heads x head_dim of that attention)
    softmax+mask+scale 7 h L_q L_k   RMSNorm N (4d + 4)     RoPE 3 L (d + d_kv)
    SwiGLU activation 5 L d_ff       residual add L d
Self-attention is causal but, as the SPEC says, L_q L_k is counted in full. Backward = 2 x forward.

Every term is listed once per kind with a multiplicity (``count``: the number of blocks or memory layers
it occurs in), so ``each x count`` can be checked by hand against the rule printed beside it.

Two choices the SPEC leaves open, made here:
  * auxiliary losses (SPEC 1.4), per memory layer: load balance = 2 C_r per routing unit (accumulate
    the top-k indicator into f and p into P) + 2 C_r + 1 once (products f_i P_i, their sum, the C_r
    scale); z-loss = 2 C + 3 per routing unit (C exps, C adds, one log, one square, one accumulate).
  * rolling pooling adds a prefix sum d (n - 1) and a window difference and divide 2 d n before the
    mean of the window means, which costs what mean pooling does.
The memory preprocessing RMSNorm is counted only when ``normalize_before_mixing`` is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from moc_megatron.config import Config
from moc_megatron.errors import UserError


# ---------------------------------------------------------------------------------------------
# Parameters


def count_parameters(cfg: Config) -> dict:
    """Exact parameter counts: {total, backbone, bank, memory_layers}. Tied embedding counted once."""
    cfg.resolve()
    backbone = cfg.model.vocab_size * cfg.model.hidden_size + cfg.model.num_layers * _block_params(cfg)
    backbone += cfg.model.hidden_size  # final norm
    bank = cfg.num_banks * cfg.memory.tokens * cfg.model.hidden_size
    memory_layers = len(cfg.memory.layers) * _memory_layer_params(cfg)
    return {"total": backbone + bank + memory_layers, "backbone": backbone, "bank": bank,
            "memory_layers": memory_layers}


def _block_params(cfg: Config) -> int:
    m, d = cfg.model, cfg.model.hidden_size
    q_width = m.num_attention_heads * cfg.head_dim
    kv_width = m.num_query_groups * cfg.head_dim
    attention = d * q_width + 2 * d * kv_width + q_width * d
    mlp = 3 * d * m.ffn_hidden_size
    return 2 * d + attention + mlp  # two norms, no biases


def _memory_layer_params(cfg: Config) -> int:
    mem, d = cfg.memory, cfg.model.hidden_size
    q_width = mem.num_heads * cfg.memory_head_dim
    kv_width = mem.num_kv_heads * cfg.memory_head_dim
    router = mem.chapters * d + mem.chapters  # the router is the only layer with a bias
    return d + router + d * q_width + 2 * d * kv_width + q_width * d


# ---------------------------------------------------------------------------------------------
# FLOPs report


@dataclass(frozen=True)
class Term:
    """One kind of work: ``each`` FLOPs per occurrence, ``count`` occurrences per sequence."""
    name: str
    each: float
    count: int = 1
    rule: str = ""

    @property
    def flops(self) -> float:
        return self.each * self.count


@dataclass
class FlopsReport:
    seq_length: int
    terms: list = field(default_factory=list)

    @property
    def forward_flops(self) -> float:
        return sum(t.flops for t in self.terms)

    @property
    def backward_flops(self) -> float:
        return 2 * self.forward_flops

    @property
    def total_flops(self) -> float:
        return 3 * self.forward_flops

    def items(self) -> list:
        """The terms as (name, flops) pairs."""
        return [(t.name, t.flops) for t in self.terms]

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)


def _linear(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def _rmsnorm(n: int, d: int) -> int:
    return n * (4 * d + 4)


def _attention_matmuls(l_q: int, l_k: int, d: int) -> int:
    return 4 * l_q * l_k * d


def _softmax(heads: int, l_q: int, l_k: int) -> int:
    return heads * l_q * l_k * 7


def _top_k(c: int, k: int) -> int:
    return c * math.ceil(math.log2(k)) if k > 1 else 0


# ---------------------------------------------------------------------------------------------
# Routing units: sequence routing is one unit; chunk routing is L / c units, each with its own chapters.


@dataclass(frozen=True)
class RoutingUnit:
    queries: int   # positions that read this unit's chapters
    context: int   # positions the router pools over
    routed: bool   # False: reads shared chapters only (chunk 0 with first_chunk shared_only)


def routing_units(cfg: Config, seq_length: int) -> list:
    mem = cfg.memory
    if mem.routing_unit == "sequence":
        return [RoutingUnit(seq_length, seq_length, True)]
    c = mem.routing_chunk
    if seq_length % c:
        raise UserError(f"--memory-routing-chunk={c}: does not divide --seq-length={seq_length}")
    first = RoutingUnit(c, 1, True) if mem.first_chunk == "first_token" else RoutingUnit(c, 0, False)
    # chunk j pools the positions before it, so it cannot see its own tokens or later ones
    return [first] + [RoutingUnit(c, j * c, True) for j in range(1, seq_length // c)]


def selected_tokens(cfg: Config, unit: RoutingUnit) -> int:
    """N_sel = (n_shared + k) T for a routed unit; shared chapters only otherwise."""
    chapters = cfg.memory.shared_chapters + (cfg.memory.top_k if unit.routed else 0)
    return chapters * cfg.chapter_tokens


# ---------------------------------------------------------------------------------------------
# SPEC 1.6 count


def estimate_flops(cfg: Config, seq_length: int | None = None) -> FlopsReport:
    """Forward FLOPs per sequence at batch 1, by the paper's rules, every term listed."""
    cfg.resolve()
    length = seq_length or cfg.training.seq_length
    terms = _block_terms(cfg, length)
    if cfg.has_memory:
        units = routing_units(cfg, length)
        terms += _router_terms(cfg, units) + _memory_terms(cfg, length, units)
    return FlopsReport(length, terms + _head_terms(cfg, length))


def _block_terms(cfg: Config, length: int) -> list:
    m, d, n = cfg.model, cfg.model.hidden_size, cfg.model.num_layers
    q_width = m.num_attention_heads * cfg.head_dim
    kv_width = m.num_query_groups * cfg.head_dim
    f = m.ffn_hidden_size
    return [
        Term("block.attn.norm", _rmsnorm(length, d), n, f"L(4d+4) = {length}*(4*{d}+4)"),
        Term("block.attn.q_proj", _linear(length, d, q_width), n, f"2*L*d*hq = 2*{length}*{d}*{q_width}"),
        Term("block.attn.k_proj", _linear(length, d, kv_width), n, f"2*L*d*hkv = 2*{length}*{d}*{kv_width}"),
        Term("block.attn.v_proj", _linear(length, d, kv_width), n, f"2*L*d*hkv = 2*{length}*{d}*{kv_width}"),
        Term("block.attn.rope", 3 * length * (q_width + kv_width), n,
             f"3*L*(hq+hkv) = 3*{length}*({q_width}+{kv_width})"),
        Term("block.attn.matmuls", _attention_matmuls(length, length, q_width), n,
             f"4*L*L*hq = 4*{length}*{length}*{q_width}"),
        Term("block.attn.softmax", _softmax(m.num_attention_heads, length, length), n,
             f"7*h*L*L = 7*{m.num_attention_heads}*{length}*{length}"),
        Term("block.attn.o_proj", _linear(length, q_width, d), n, f"2*L*hq*d = 2*{length}*{q_width}*{d}"),
        Term("block.attn.residual", length * d, n, f"L*d = {length}*{d}"),
        Term("block.mlp.norm", _rmsnorm(length, d), n, f"L(4d+4) = {length}*(4*{d}+4)"),
        Term("block.mlp.w1", _linear(length, d, f), n, f"2*L*d*ff = 2*{length}*{d}*{f}"),
        Term("block.mlp.w3", _linear(length, d, f), n, f"2*L*d*ff = 2*{length}*{d}*{f}"),
        Term("block.mlp.swiglu", 5 * length * f, n, f"5*L*ff = 5*{length}*{f}"),
        Term("block.mlp.w2", _linear(length, f, d), n, f"2*L*ff*d = 2*{length}*{f}*{d}"),
        Term("block.mlp.residual", length * d, n, f"L*d = {length}*{d}"),
    ]


def _pooling(cfg: Config, positions: int) -> int:
    d = cfg.model.hidden_size
    mean = d * (positions - 1) + d
    if cfg.memory.pooling == "rolling":
        return mean + d * (positions - 1) + 2 * d * positions  # prefix sum, window difference and divide
    return mean


def _router_terms(cfg: Config, units: list) -> list:
    d, c, k, c_r = cfg.model.hidden_size, cfg.memory.chapters, cfg.memory.top_k, cfg.routed_chapters
    routed = [u for u in units if u.routed]
    r, n = len(routed), len(cfg.memory.layers)
    per = f" x {r} units" if r != 1 else ""
    return [
        Term("memory.router.pooling", sum(_pooling(cfg, u.context) for u in routed), n,
             f"sum over units of d(n-1)+d, n = pooled positions ({cfg.memory.pooling})"),
        Term("memory.router.linear", r * _linear(1, d, c), n, f"2*d*C = 2*{d}*{c}{per}"),
        Term("memory.router.softmax", r * 5 * c, n, f"5*C = 5*{c}{per}"),
        Term("memory.router.top_k", r * _top_k(c, k), n, f"C*ceil(log2 k) = {c}*ceil(log2 {k}){per}"),
        Term("memory.router.load_balance", (r * 2 * c_r + 2 * c_r + 1) if r else 0, n,
             f"2*C_r per unit + 2*C_r + 1, C_r = {c_r}{per}"),
        Term("memory.router.z_loss", r * (2 * c + 3), n, f"2*C + 3 = 2*{c}+3{per}"),
    ]


def _memory_terms(cfg: Config, length: int, units: list) -> list:
    return _memory_read_terms(cfg, units) + _memory_kv_terms(cfg, units)


def _memory_read_terms(cfg: Config, units: list) -> list:
    """Everything in a memory layer that does not depend on how K/V are projected."""
    mem, d, n = cfg.memory, cfg.model.hidden_size, len(cfg.memory.layers)
    q_width = mem.num_heads * cfg.memory_head_dim
    length = sum(u.queries for u in units)
    n_sel = [selected_tokens(cfg, u) for u in units]
    return [
        Term("memory.norm", _rmsnorm(length, d), n, f"L(4d+4) = {length}*(4*{d}+4)"),
        Term("memory.weighting", sum(s * d for s in n_sel), n, f"N_sel*d per unit, N_sel = {_show(n_sel)}"),
        Term("memory.q_proj", _linear(length, d, q_width), n, f"2*L*d*hq = 2*{length}*{d}*{q_width}"),
        Term("memory.attn.matmuls", sum(_attention_matmuls(u.queries, s, q_width) for u, s in zip(units, n_sel)),
             n, f"4*L_q*N_sel*hq per unit, hq = {q_width}"),
        Term("memory.attn.softmax", sum(_softmax(mem.num_heads, u.queries, s) for u, s in zip(units, n_sel)),
             n, f"7*h*L_q*N_sel per unit, h = {mem.num_heads}"),
        Term("memory.o_proj", _linear(length, q_width, d), n, f"2*L*hq*d = 2*{length}*{q_width}*{d}"),
        Term("memory.residual", length * d, n, f"L*d = {length}*{d}"),
    ]


def _memory_kv_terms(cfg: Config, units: list) -> list:
    """SPEC count: every routing unit normalises and projects its own N_sel tokens."""
    n_sel = [selected_tokens(cfg, u) for u in units]
    return _kv_terms(cfg, sum(n_sel), f"per unit, N_sel = {_show(n_sel)}")


def _kv_terms(cfg: Config, tokens: float, note: str) -> list:
    mem, d, n = cfg.memory, cfg.model.hidden_size, len(cfg.memory.layers)
    kv_width = mem.num_kv_heads * cfg.memory_head_dim
    terms = []
    if mem.normalize_before_mixing:
        terms.append(Term("memory.preprocess_norm", tokens * (4 * d + 4), n, f"N(4d+4), {note}"))
    terms += [Term("memory.k_proj", tokens * 2 * d * kv_width, n, f"2*N*d*hkv, hkv = {kv_width}, {note}"),
              Term("memory.v_proj", tokens * 2 * d * kv_width, n, f"2*N*d*hkv, hkv = {kv_width}, {note}")]
    return terms


def _head_terms(cfg: Config, length: int) -> list:
    d, v = cfg.model.hidden_size, cfg.model.vocab_size
    return [
        Term("head.norm", _rmsnorm(length, d), 1, f"L(4d+4) = {length}*(4*{d}+4)"),
        Term("head.lm_head", _linear(length, d, v), 1, f"2*L*d*V = 2*{length}*{d}*{v}"),
        Term("head.cross_entropy", (length - 1) * v * 5, 1, f"(L-1)*V*5 = {length - 1}*{v}*5"),
    ]


def _show(values: list) -> str:
    if len(set(values)) == 1:
        return f"{values[0]}" + (f" x {len(values)} units" if len(values) > 1 else "")
    return "+".join(map(str, values))


# ---------------------------------------------------------------------------------------------
# What the implementation spends: K/V projected once per micro-batch for the unique chapters


def expected_unique_chapters(cfg: Config, micro_batch_size: int, seq_length: int | None = None) -> float:
    """Unique chapters a micro-batch reads if every routing unit picks k of C_r uniformly at random.

    A routed chapter is missed by one unit with probability 1 - k/C_r, by all B x units independently
    with (1 - k/C_r)^(B units); shared chapters are always read.
    """
    mem, c_r = cfg.memory, cfg.routed_chapters
    draws = micro_batch_size * _routed_unit_count(cfg, seq_length)
    missed = (1 - mem.top_k / c_r) ** draws if c_r else 1.0
    return mem.shared_chapters + c_r * (1 - missed)


def worst_case_unique_chapters(cfg: Config, micro_batch_size: int, seq_length: int | None = None) -> int:
    """Every routing unit picks chapters no other unit picked, until the bank runs out."""
    draws = micro_batch_size * _routed_unit_count(cfg, seq_length)
    return min(cfg.routed_chapters, draws * cfg.memory.top_k) + cfg.memory.shared_chapters


def _routed_unit_count(cfg: Config, seq_length: int | None) -> int:
    cfg.resolve()
    return sum(u.routed for u in routing_units(cfg, seq_length or cfg.training.seq_length))


def implemented_flops(cfg: Config, seq_length: int | None = None, micro_batch_size: int | None = None,
                      worst_case: bool = False) -> FlopsReport:
    """Per-sequence forward FLOPs of the implementation at micro-batch B.

    The bank normalisation and K/V projections run once per micro-batch over the unique chapters
    (expected under uniform routing, or the worst case), divided by B; attention, the per-unit
    weighting and every other term are the SPEC count.
    """
    report = estimate_flops(cfg, seq_length)
    if not cfg.has_memory:
        return report
    batch = micro_batch_size or cfg.training.micro_batch_size
    unique = (worst_case_unique_chapters if worst_case else expected_unique_chapters)(cfg, batch, report.seq_length)
    tokens_per_sequence = unique * cfg.chapter_tokens / batch
    kv_names = {t.name for t in _kv_terms(cfg, 0, "")}
    kept = [t for t in report.terms if t.name not in kv_names]
    note = f"{unique:.2f} unique chapters x T={cfg.chapter_tokens} / B={batch}"
    return replace(report, terms=kept + _kv_terms(cfg, tokens_per_sequence, note))


def implemented_forward_flops(cfg: Config, seq_length: int | None = None, micro_batch_size: int | None = None,
                              worst_case: bool = False) -> float:
    return implemented_flops(cfg, seq_length, micro_batch_size, worst_case).forward_flops


# ---------------------------------------------------------------------------------------------
# Iso-FLOP vanilla depth


def matched_vanilla_layers(cfg: Config, seq_length: int | None = None) -> int:
    """Depth of the same backbone without memory whose forward FLOPs are closest to ``cfg``'s."""
    cfg.resolve()
    length = seq_length or cfg.training.seq_length
    target = estimate_flops(cfg, length).forward_flops
    per_block = sum(t.each for t in _block_terms(cfg, length))
    head = sum(t.flops for t in _head_terms(cfg, length))
    guess = max(1, int((target - head) // per_block))
    return min((guess, guess + 1), key=lambda n: abs(n * per_block + head - target))
