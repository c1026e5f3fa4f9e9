"""Does the memory's cost stay flat as the bank grows? Forward+backward, ours vs the naive formulation.

    python benchmarks/bench_memory_layer.py [--json FILE] [--runs R] [--warmup W] [--threads N] [--no-model]

Banks of 257 / 1025 / 4097 chapters x 64 tokens (16K / 65K / 262K tokens, 1 shared chapter), top-k 8,
d 128, 4 memory heads, sequence 256, micro-batch 8, fp32, sequence routing. Implementations:

    moc        MemoryBranch, bank with sparse_grad=True (--memory-bank-optimizer sparse_adam): K/V projected
               once for the unique chapters, read by chapter index; the bank gradient holds only the rows read;
               routing statistics by bincount
    moc_dense  the same with the default dense bank gradient (adamw mode, what DeepSpeed's ZeRO needs)
    naive      the public research code's formulation, vectorised over the batch: one flat (N_m, d) bank
               parameter expanded to the batch and torch.gather'ed into per-sequence (b, n*t, d) copies of
               the selected tokens (its backward builds a dense (b, N_m, d) buffer, then the dense bank
               gradient), normalise, weight, project, attend; routing statistics from a one-hot (b, k, C)
    naive_index  naive with bank[token_ids] instead of expand + gather: per-sequence copies and a dense
               (N_m, d) bank gradient, without the batch-sized buffer (shown so the gap is not all one choice)

Memory-layer case: router, its losses and statistics, RMSNorm_m and the memory read on given hidden
states h, h_in (b, s, d) (gradients flow into them too). Whole-model case: configs/models/moc-tiny.yaml
(4 layers, memory at 1 and 3 sharing one bank) with the bank size varied, loss.backward(); for naive the
memory read of both layers is swapped for the naive one (the model's own bincount losses are kept).

Time: median of R runs after W warm-up runs, every run starting with gradients set to None (as
zero_grad does), the implementations and bank sizes interleaved run by run so background load hits
all alike. The fastest run is shown too (the least disturbed by other load on a shared machine);
the JSON rows carry it as min_ms next to the median fwd_bwd_ms. Peak memory: one further run under
torch.profiler(profile_memory=True): the high-water mark of bytes held by torch's CPU allocator
during forward+backward, above what was live before it (parameters and inputs excluded, the new
gradients included), from the profiler's allocation records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from moc_megatron.config import load_config
from moc_megatron.model.gpt import MemoryBank, MemoryBranch, MoCModel, seeded
from moc_megatron.model.memory import Routing, router_losses, router_stats
from moc_megatron.parallel.state import single_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = (257, 1025, 4097)
T, D, TOP_K, SEQ, BATCH, HEADS = 64, 128, 8, 256, 8, 4
IMPLS = ("moc", "moc_dense", "naive", "naive_index")


# ---------------------------------------------------------------------------------------------
# The naive formulation (the research code's, vectorised over the batch).


class FlatBank(nn.Module):
    """The research code's bank: one (N_m, d) parameter, no chapter structure in storage."""

    def __init__(self, bank: MemoryBank):
        super().__init__()
        full = torch.cat([p.detach() for p in (bank.shared, bank.routed) if p is not None])  # (c, t, d)
        self.t = full.shape[1]
        self.memory = nn.Parameter(full.reshape(-1, full.shape[-1]).clone())


def naive_route(branch: MemoryBranch, h_in: torch.Tensor, cfg):
    """Sequence routing as SPEC 1.2, with one-hot load statistics as the research code computes them."""
    mem, ns = cfg.memory, cfg.memory.shared_chapters
    z = branch.router.proj(h_in.mean(1)).float()                       # (b, c)
    p = z.softmax(-1)
    routed = p[:, ns:] / p[:, ns:].sum(-1, keepdim=True)
    g, idx = routed.topk(mem.top_k, dim=-1)
    g = g / g.sum(-1, keepdim=True) * mem.routed_scaling_factor
    b = h_in.shape[0]
    chapters = torch.cat([torch.arange(ns).expand(b, ns), idx + ns], -1)     # (b, n)
    weights = torch.cat([torch.ones(b, ns), g], -1)
    weights = weights / weights.sum(-1, keepdim=True)
    one_hot = F.one_hot(idx + ns, mem.chapters).float()                 # (b, k, c)
    f = one_hot.sum(1).mean(0)[ns:] / mem.top_k
    P = (p[:, ns:] / p[:, ns:].sum(-1, keepdim=True)).mean(0)
    lb = cfg.routed_chapters * (f * P).sum()
    z_loss = torch.logsumexp(z, -1).pow(2).mean()
    routing = Routing(chapters[:, None], weights[:, None], z[:, None], p[:, None], torch.ones(b, 1, dtype=torch.bool))
    return routing, lb, z_loss


def naive_read(branch: MemoryBranch, h: torch.Tensor, flat: FlatBank, chapters, weights, expand: bool):
    """Per-sequence copies of the selected tokens, then normalise, weight, project, attend."""
    read, eps = branch.memory_attn, branch.cfg.model.norm_epsilon
    b, s, d = h.shape
    t = flat.t
    tokens = (chapters[..., None] * t + torch.arange(t)).reshape(b, -1)  # (b, n*t) ids into the flat bank
    if expand:  # the research code: bank.unsqueeze(0).expand(b, ...) + torch.gather
        x = torch.gather(flat.memory.unsqueeze(0).expand(b, -1, -1), 1, tokens[..., None].expand(-1, -1, d))
    else:
        x = flat.memory[tokens]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x = x * weights.repeat_interleave(t, dim=1)[..., None]
    hq = branch.memory_layernorm(h)
    q = F.linear(hq, read.q_proj.weight).view(b, s, -1, read.e).transpose(1, 2)
    k = F.linear(x, read.k_proj.weight).view(b, x.shape[1], -1, read.e).transpose(1, 2)
    v = F.linear(x, read.v_proj.weight).view(b, x.shape[1], -1, read.e).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(b, s, -1)
    return F.linear(out, read.o_proj.weight)


class NaiveBranch(nn.Module):
    """Drop-in for a model's MemoryBranch: the same weights, the naive read (for the whole-model case)."""

    def __init__(self, branch: MemoryBranch, expand: bool):
        super().__init__()
        self.branch, self.expand = branch, expand

    def forward(self, h, h_in, flat: FlatBank, valid):
        routing, _, _ = naive_route(self.branch, h_in, self.branch.cfg)
        out = naive_read(self.branch, h, flat, routing.chapters[:, 0], routing.weights[:, 0], self.expand)
        return out, routing


# ---------------------------------------------------------------------------------------------
# Cases: a closure running one forward+backward, and the parameters whose gradients it fills.


def layer_cfg(chapters: int):
    return load_config(model=dict(num_layers=1, hidden_size=D, num_attention_heads=HEADS, vocab_size=4096),
                       memory=dict(layers=[0], tokens=chapters * T, chapters=chapters, shared_chapters=1,
                                   top_k=TOP_K, num_heads=HEADS, num_kv_heads=HEADS),
                       training=dict(seq_length=SEQ)).validate()


def layer_cases(ctx, chapters: int):
    """impl -> (run, module) for one memory layer over a bank of `chapters` chapters."""
    cfg = layer_cfg(chapters)
    with seeded(0, "bench"):
        branch = MemoryBranch(ctx, cfg)
        nn.init.normal_(branch.memory_attn.o_proj.weight, std=0.02)  # as after training (zero at init)
        sparse_bank = MemoryBank(cfg, 0.02, sparse_grad=True)
    dense_bank = MemoryBank(cfg, 0.02)
    dense_bank.load_state_dict(sparse_bank.state_dict())
    flat = FlatBank(sparse_bank)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(BATCH, SEQ, D, generator=gen).requires_grad_()
    h_in = torch.randn(BATCH, SEQ, D, generator=gen).requires_grad_()
    g_out = torch.randn(BATCH, SEQ, D, generator=gen)
    mem = cfg.memory

    def ours(bank):
        out, routing = branch(h, h_in, bank, None)
        losses = router_losses(routing, cfg)
        router_stats(routing, cfg)
        aux = mem.load_balance_coeff * losses["load_balance_loss"] + mem.z_loss_coeff * losses["z_loss"]
        loss = (out * g_out).sum() + aux
        loss.backward()
        return out

    def naive(expand):
        routing, lb, z_loss = naive_route(branch, h_in, cfg)
        out = naive_read(branch, h, flat, routing.chapters[:, 0], routing.weights[:, 0], expand)
        loss = (out * g_out).sum() + mem.load_balance_coeff * lb + mem.z_loss_coeff * z_loss
        loss.backward()
        return out

    leaves = [h, h_in, *branch.parameters()]
    cases = {"moc": (lambda: ours(sparse_bank), [*leaves, *sparse_bank.parameters()]),
             "moc_dense": (lambda: ours(dense_bank), [*leaves, *dense_bank.parameters()]),
             "naive": (lambda: naive(True), [*leaves, flat.memory]),
             "naive_index": (lambda: naive(False), [*leaves, flat.memory])}
    check_same_output(cases)
    return cases


def check_same_output(cases) -> None:
    """All implementations compute the same function (SPEC 1.3: 1e-5 relative in fp32)."""
    outs = {}
    for name, (run, params) in cases.items():
        outs[name] = run().detach()
        clear(params)
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["moc"], rtol=1e-5, atol=1e-6, msg=f"{name} differs from moc")


def model_cases(ctx, chapters: int):
    """impl -> (run, params) for the whole moc-tiny model with a bank of `chapters` chapters."""
    models = {}
    for impl in IMPLS:
        cfg = load_config(f"{ROOT}/configs/models/moc-tiny.yaml",
                          memory=dict(chapters=chapters, tokens=chapters * T),
                          training=dict(seq_length=SEQ,
                                        memory_bank_optimizer="sparse_adam" if impl == "moc" else "adamw"))
        model = MoCModel(cfg.validate(), ctx)
        for block in model.layers:
            if block.memory is not None:
                gen = torch.Generator().manual_seed(block.layer_idx)
                nn.init.normal_(block.memory.memory_attn.o_proj.weight, std=0.02, generator=gen)
                if impl.startswith("naive"):
                    block.memory = NaiveBranch(block.memory, expand=impl == "naive")
        if impl.startswith("naive"):
            model.banks = nn.ModuleList([FlatBank(model.banks[0])])
        models[impl] = model
    tokens = torch.randint(0, 4096, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(2))

    def step(model):
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        return out.loss

    cases = {impl: (lambda m=m: step(m), list(m.parameters())) for impl, m in models.items()}
    losses = {}
    for impl, (run, params) in cases.items():
        losses[impl] = run().item()
        clear(params)
    assert all(math.isclose(v, losses["moc"], rel_tol=1e-5) for v in losses.values()), losses
    return cases


# ---------------------------------------------------------------------------------------------
# Measurement.


def clear(params) -> None:
    for p in params:
        p.grad = None


def timed_ms(run, params) -> float:
    clear(params)
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def peak_mb(run, params) -> float:
    """High-water mark of torch CPU allocator bytes during one run, above the level before it."""
    clear(params)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = prof.profiler.kineto_results.events()
    records = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    clear(params)
    return peak / 2**20


def measure(cases: dict, runs: int, warmup: int) -> list[dict]:
    """cases: (bank_tokens, impl) -> (run, params). Interleaved timing, then one profiled run each."""
    times = {key: [] for key in cases}
    for rep in range(warmup + runs):
        for key, (run, params) in cases.items():
            ms = timed_ms(run, params)
            if rep >= warmup:
                times[key].append(ms)
    rows = []
    for (bank_tokens, impl), (run, params) in cases.items():
        ms = times[(bank_tokens, impl)]
        rows.append({"impl": impl, "bank_tokens": bank_tokens, "fwd_bwd_ms": statistics.median(ms),
                     "min_ms": min(ms), "peak_mb": peak_mb(run, params)})
        clear(params)
    return rows


def add_ratios(rows: list[dict]) -> None:
    smallest = min(r["bank_tokens"] for r in rows)
    base = {r["impl"]: r["fwd_bwd_ms"] for r in rows if r["bank_tokens"] == smallest}
    for r in rows:
        r["ratio_to_16k"] = r["fwd_bwd_ms"] / base[r["impl"]]


def table(title: str, rows: list[dict]) -> str:
    lines = [title, f"{'impl':<12}{'bank tokens':>12}{'fwd+bwd ms':>12}{'min ms':>9}{'x 16K':>8}{'peak MB':>10}"]
    for r in sorted(rows, key=lambda r: (IMPLS.index(r["impl"]), r["bank_tokens"])):
        lines.append(f"{r['impl']:<12}{r['bank_tokens']:>12}{r['fwd_bwd_ms']:>12.1f}{r['min_ms']:>9.1f}"
                     f"{r['ratio_to_16k']:>8.2f}{r['peak_mb']:>10.1f}")
    return "\n".join(lines)


def targets(rows: list[dict], key: str) -> list[tuple[str, float, str, bool | None]]:
    """The issue's targets on the memory-layer case from time `key`: (what, value, goal, met)."""
    at = {(r["impl"], r["bank_tokens"]): r for r in rows}
    small, big = min(r["bank_tokens"] for r in rows), max(r["bank_tokens"] for r in rows)
    flat = at["moc", big][key] / at["moc", small][key]
    speed = at["naive", big][key] / at["moc", big][key]
    speed_index = at["naive_index", big][key] / at["moc", big][key]
    memory = at["moc", big]["peak_mb"] / at["naive", big]["peak_mb"]
    return [("moc 262K / moc 16K time", flat, "<= 1.25", flat <= 1.25),
            ("naive / moc time at 262K", speed, ">= 3", speed >= 3),
            ("moc / naive peak memory at 262K", memory, "< 0.5", memory < 0.5),
            ("naive_index / moc time at 262K", speed_index, "(none)", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the memory-layer rows (and the model rows) to this file")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per case (at least 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model case")
    args = parser.parse_args()
    if args.runs < 10:
        parser.error("--runs must be at least 10")
    torch.set_num_threads(args.threads)
    ctx = single_process()
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); bank chapters {CHAPTERS} x {T} tokens (1 shared), "
          f"top-k {TOP_K}, d {D}, heads {HEADS}, seq {SEQ}, micro-batch {BATCH}, fp32; "
          f"median of {args.runs} runs after {args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}")
    layer = measure({(c * T, impl): case for c in CHAPTERS for impl, case in layer_cases(ctx, c).items()},
                    args.runs, args.warmup)
    add_ratios(layer)
    print(table("\nOne memory layer (router + losses + read), forward+backward", layer))
    for key, label in (("fwd_bwd_ms", "median"), ("min_ms", "fastest run")):
        print(f"\nTargets (memory layer, {label} times):")
        for what, value, goal, met in targets(layer, key):
            print(f"  {what:<36}{value:>8.2f}  {goal:<8}{'' if met is None else ('met' if met else 'MISSED')}")
    keys = ("impl", "bank_tokens", "fwd_bwd_ms", "peak_mb", "min_ms")
    result = {"rows": [{k: r[k] for k in keys} for r in layer],
              "settings": {"chapter_tokens": T, "chapters": list(CHAPTERS), "shared_chapters": 1, "top_k": TOP_K,
                           "hidden": D, "heads": HEADS, "seq": SEQ, "micro_batch": BATCH, "threads": args.threads,
                           "runs": args.runs, "warmup": args.warmup, "statistic": "median"}}
    if not args.no_model:
        model = measure({(c * T, impl): case for c in CHAPTERS for impl, case in model_cases(ctx, c).items()},
                        args.runs, args.warmup)
        add_ratios(model)
        print(table("\nWhole moc-tiny model (4 layers, 2 memory layers, one bank), forward+backward", model))
        result["model_rows"] = [{k: r[k] for k in keys} for r in model]
    load = os.getloadavg()
    print(f"\nLoad average (1, 5, 15 min) at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} CPUs")
    result["settings"]["load_average_at_end"] = [round(x, 2) for x in load]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
