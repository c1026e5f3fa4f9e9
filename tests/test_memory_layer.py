"""The memory branch against a deliberately naive reference (SPEC 1.2-1.4).

The reference loops over routing units: pool, route, gather the selected tokens of that unit from
the bank, normalise, weight, project, attend. The model projects K/V once for the unique chapters
of the micro-batch and reads them by chapter index; both must agree in fp32 to 1e-5 relative,
forward, aux losses and every gradient (router included).
"""

import math

import pytest
import torch

from moc_megatron.config import load_config
from moc_megatron.model.gpt import MemoryBranch, MemoryBank, seeded


def naive_memory_branch(p, h, h_in, bank, valid, cfg):
    """Per-unit reference. p: dict of plain weight tensors. Returns out (b, s, d), lb, z."""
    mem, eps = cfg.memory, cfg.model.norm_epsilon
    b, s, d = h.shape
    c_len = s if mem.routing_unit == "sequence" else mem.routing_chunk
    e = d // mem.num_heads
    out = torch.zeros_like(h)
    unit_probs, unit_routed, unit_logits = [], [], []
    for bi in range(b):
        for j in range(-(-s // c_len)):  # the last chunk may be shorter
            # --- pooling: which positions this unit's router may see
            if mem.routing_unit == "sequence":
                ctx_pos = [t for t in range(s) if valid is None or valid[bi, t]]
            elif j == 0:
                ctx_pos = [0]
            else:
                ctx_pos = [t for t in range(j * c_len) if valid is None or valid[bi, t]]
            states = h_in[bi]
            if mem.pooling == "rolling":
                w = mem.rolling_window
                rows = []
                for t in range(s):
                    win = [u for u in range(max(0, t - w + 1), t + 1) if valid is None or valid[bi, u]]
                    rows.append(states[win].mean(0) if win else torch.zeros(d))
                states = torch.stack(rows)
            r = states[ctx_pos].mean(0)
            # --- router
            z = r @ p["router_w"].T + p["router_b"]
            prob = torch.softmax(z, -1)
            active = not (mem.routing_unit == "chunk" and j == 0 and mem.first_chunk == "shared_only")
            shared = list(range(mem.shared_chapters))
            routed_p = prob[mem.shared_chapters:] / prob[mem.shared_chapters:].sum()
            g, idx = torch.topk(routed_p, mem.top_k)
            g = g / g.sum() * mem.routed_scaling_factor
            chapters = shared + [int(i) + mem.shared_chapters for i in idx] if active else shared
            weights = torch.cat([torch.ones(len(shared)), g if active else g[:0]])
            weights = weights / weights.sum()
            if active:
                unit_probs.append(prob)
                unit_routed.append([int(i) + mem.shared_chapters for i in idx])
                unit_logits.append(z)
            # --- memory tokens of this unit: gather, normalise, weight
            x = torch.cat([bank[ch] for ch in chapters])                  # (n*t, d)
            if mem.normalize_before_mixing:
                x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            x = x * torch.repeat_interleave(weights, bank.shape[1])[:, None]
            # --- attention
            hq = h[bi, j * c_len:(j + 1) * c_len]
            hq = hq / torch.sqrt(hq.pow(2).mean(-1, keepdim=True) + eps) * p["norm_w"]
            q = (hq @ p["wq"].T).view(hq.shape[0], mem.num_heads, e)
            k = (x @ p["wk"].T).view(-1, mem.num_kv_heads, e)
            v = (x @ p["wv"].T).view(-1, mem.num_kv_heads, e)
            rep = mem.num_heads // mem.num_kv_heads
            heads = []
            for hh in range(mem.num_heads):
                att = torch.softmax(q[:, hh] @ k[:, hh // rep].T / math.sqrt(e), -1)
                heads.append(att @ v[:, hh // rep])
            out[bi, j * c_len:(j + 1) * c_len] = torch.cat(heads, -1) @ p["wo"].T
    # --- aux losses over routed units (SPEC 1.4, the normalised form)
    C, k_, ns = mem.chapters, mem.top_k, mem.shared_chapters
    f = torch.zeros(C - ns)
    for ids in unit_routed:
        for i in ids:
            f[i - ns] += 1.0 / (len(unit_routed) * k_)
    P = torch.stack([pr[ns:] / pr[ns:].sum() for pr in unit_probs]).mean(0)
    lb = (C - ns) * (f * P).sum()
    zl = torch.stack([torch.logsumexp(zz, -1) ** 2 for zz in unit_logits]).mean()
    return out, lb, zl


def weights_of(branch):
    return {"router_w": branch.router.proj.weight, "router_b": branch.router.proj.bias,
            "norm_w": branch.memory_layernorm.weight,
            "wq": branch.memory_attn.q_proj.weight, "wk": branch.memory_attn.k_proj.weight,
            "wv": branch.memory_attn.v_proj.weight, "wo": branch.memory_attn.o_proj.weight}


CASES = {
    "shared0_topk1": dict(shared_chapters=0, top_k=1),
    "shared1_topk3": dict(shared_chapters=1, top_k=3),
    "shared2_topk4_nonorm": dict(shared_chapters=2, top_k=4, normalize_before_mixing=False),
    "gqa": dict(num_heads=4, num_kv_heads=2, top_k=2),
    "rolling": dict(pooling="rolling", rolling_window=3, top_k=2),
    "chunk": dict(routing_unit="chunk", routing_chunk=4, top_k=2),
    "chunk_shared_only": dict(routing_unit="chunk", routing_chunk=4, first_chunk="shared_only", top_k=3),
    "chunk_ragged": dict(routing_unit="chunk", routing_chunk=4, top_k=2),
    "chunk_ragged_gqa": dict(routing_unit="chunk", routing_chunk=4, first_chunk="shared_only", top_k=3,
                             num_heads=4, num_kv_heads=2),
}
LENGTH = {"chunk_ragged": 7, "chunk_ragged_gqa": 6}  # a last chunk of 3 or 2 positions (generation reads these)


def tiny_cfg(**memory):
    mem = dict(layers=[0], tokens=12 * 3, chapters=12, shared_chapters=1, top_k=2, num_heads=2,
               num_kv_heads=2, bank_init_std=0.5)
    mem.update(memory)
    cfg = load_config(model=dict(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32),
                      memory=mem, training=dict(seq_length=8))
    return cfg.validate()


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_memory_branch_matches_naive_reference(ctx, case, padded):
    torch.manual_seed(0)
    cfg = tiny_cfg(**CASES[case])
    with seeded(0, "test"):
        branch = MemoryBranch(ctx, cfg)
        bank = MemoryBank(cfg, 0.5)
        torch.nn.init.normal_(branch.memory_attn.o_proj.weight, std=0.2)  # zero init would hide gradients
        torch.nn.init.normal_(branch.router.proj.weight, std=0.5)          # distinct routing per unit
    b, s = 3, LENGTH.get(case, 8)
    h_in = torch.randn(b, s, 16, requires_grad=True)
    h = torch.randn(b, s, 16, requires_grad=True)
    valid = None
    if padded:
        valid = torch.ones(b, s, dtype=torch.bool)
        valid[1, 5:] = False
        valid[2, 7:] = False

    out, routing = branch(h, h_in, bank, valid)
    from moc_megatron.model.memory import router_losses
    losses = router_losses(routing, cfg)
    bank_params = [p for p in (bank.shared, bank.routed) if p is not None]
    full_bank = torch.cat(bank_params)  # (c, t, d) in global chapter order
    ref_out, ref_lb, ref_z = naive_memory_branch(weights_of(branch), h, h_in, full_bank, valid, cfg)

    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, **close)
    torch.testing.assert_close(losses["load_balance_loss"], ref_lb, **close)
    torch.testing.assert_close(losses["z_loss"], ref_z, **close)

    # every gradient: inputs, bank, router, norm, projections
    g_out = torch.randn_like(out)
    leaves = [h, h_in, *bank_params, *weights_of(branch).values()]
    names = ["h", "h_in", *[f"bank{i}" for i in range(len(bank_params))], *weights_of(branch)]
    ours = torch.autograd.grad((out * g_out).sum() + losses["load_balance_loss"] + losses["z_loss"], leaves)
    ref = torch.autograd.grad((ref_out * g_out).sum() + ref_lb + ref_z, leaves)
    for name, a, r in zip(names, ours, ref):
        scale = r.abs().max().clamp(min=1e-12)
        assert (a - r).abs().max() <= 1e-5 * scale, f"gradient of {name} differs"
    assert ours[names.index("router_w")].abs().sum() > 0, "router must receive gradient"


def test_bank_gradient_touches_only_selected_chapters(ctx):
    cfg = tiny_cfg(shared_chapters=1, top_k=2)
    with seeded(0, "test"):
        branch = MemoryBranch(ctx, cfg)
        bank = MemoryBank(cfg, 0.5)
        torch.nn.init.normal_(branch.memory_attn.o_proj.weight, std=0.2)
    h = torch.randn(1, 8, 16)
    out, routing = branch(h, h, bank, None)
    out.sum().backward()
    grad = torch.cat([bank.shared.grad, bank.routed.grad])
    touched = set(torch.nonzero(grad.abs().sum((1, 2))).flatten().tolist())
    assert touched == set(routing.chapters.flatten().tolist())


def test_aux_losses_authors_form_has_minimum_k(ctx):
    """Uniform routing: our normalised load balance is 1, the authors' form is k (SPEC 1.4)."""
    from moc_megatron.model.memory import Routing, router_losses

    for form, expected in [("normalized", 1.0), ("authors", 3.0)]:
        cfg = tiny_cfg(shared_chapters=0, top_k=3, chapters=12, tokens=36, load_balance_form=form)
        units = 4  # each chapter picked exactly once: 4 units x 3 = 12 chapters
        chapters = torch.arange(12).view(1, units, 3)
        probs = torch.full((1, units, 12), 1 / 12)
        routing = Routing(chapters, torch.full((1, units, 3), 1 / 3), torch.zeros(1, units, 12), probs,
                          torch.ones(1, units, dtype=torch.bool))
        lb = router_losses(routing, cfg)["load_balance_loss"]
        assert abs(lb.item() - expected) < 1e-6, form


@pytest.mark.parametrize("routing_unit", ["sequence", "chunk"])
def test_recomputing_chapter_kv_gives_identical_gradients_and_keeps_less(ctx, routing_unit):
    """--memory-recompute-kv: the chapter attention's outputs are kept, K/V rebuilt in backward."""
    from moc_megatron.config import load_config
    from moc_megatron.model.gpt import MemoryBranch
    from moc_megatron.model.memory import MemoryBank

    results = {}
    for recompute in (False, True):
        cfg = load_config(model=dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64),
                          memory=dict(layers=[0], tokens=33 * 4, chapters=33, top_k=4, routing_unit=routing_unit,
                                      routing_chunk=4, recompute_kv=recompute),
                          training=dict(seq_length=16)).validate()
        torch.manual_seed(0)
        branch, bank = MemoryBranch(ctx, cfg), MemoryBank(cfg, 0.02)
        torch.nn.init.normal_(branch.memory_attn.o_proj.weight, std=0.02)
        g = torch.Generator().manual_seed(1)
        h, h_in = (torch.randn(2, 16, 32, generator=g).requires_grad_() for _ in range(2))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out, _ = branch(h, h_in, bank, None)
        out.square().sum().backward()
        params = [h, h_in, *branch.parameters(), *bank.parameters()]
        results[recompute] = (out.detach(), [p.grad.clone() for p in params], sum(saved))
    (out0, grads0, kept0), (out1, grads1, kept1) = results[False], results[True]
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert kept1 < kept0


@pytest.mark.parametrize("pooling", ["mean", "rolling"])
@pytest.mark.parametrize("routing_unit", ["sequence", "chunk"])
def test_bf16_pooling_at_seq_4096_is_within_bf16_rounding_of_fp32(routing_unit, pooling):
    """Pooling and its counts run in fp32 whatever the hidden dtype: bf16 counts are exact only up to 256,
    so a bf16 prefix count at 4096 positions would be off by whole tokens. What remains is the rounding
    of the inputs themselves: at most 2^-9 of their magnitude per element, so of any mean of them."""
    from moc_megatron.model.memory import pool_units

    from moc_megatron.config import load_config

    cfg = load_config(model=dict(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32),
                      memory=dict(layers=[0], tokens=12 * 3, chapters=12, top_k=2, routing_unit=routing_unit,
                                  routing_chunk=128, pooling=pooling, rolling_window=64),
                      training=dict(seq_length=4096)).validate()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4096, 16, generator=g) + 3.0  # an offset: long sums are where bf16 loses
    valid = torch.ones(2, 4096, dtype=torch.bool)
    valid[1, 3000:] = False
    for mask in (None, valid):
        r32, act32 = pool_units(h, mask, cfg)
        r16, act16 = pool_units(h.bfloat16(), mask, cfg)
        assert r16.dtype == torch.float32 and torch.equal(act16, act32)
        assert (r16 - r32).abs().max() <= 2.0 ** -9 * h.abs().max()
