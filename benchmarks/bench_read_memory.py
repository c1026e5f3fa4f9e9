"""Activation memory of one memory layer at the paper's shapes: sequence routing against chunk routing.

The memory branch of configs/models/moc-paper.yaml (d 768, 12 heads, bank 4097 x 64 tokens, top-64,
1 shared chapter) reads seq 1024 at micro-batch 2, with sequence routing and with causal chunk routing
(chunk 128: 8 units per sequence, each with its own 65 chapters). Measured per case, fp32 and bf16:
  - held: bytes the forward leaves allocated while its output is alive (torch.profiler's allocation
    records, net over the forward): the activations kept for backward, the branch's activation memory;
  - peak: the high-water mark of torch's CPU allocator during forward+backward above what was live
    before (torch.profiler, profile_memory=True).
Each with K/V kept (default) and with --memory-recompute-kv (K/V of the selected chapters rebuilt in
backward; the chapter-attention outputs kept).
Target (issue #13): chunk routing's held bytes at most 1.2x sequence routing's.

    python benchmarks/bench_read_memory.py [--micro-batch 2] [--out benchmarks/results/read_memory]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _allocations(fn):
    """fn()'s result and its allocator records [(time, +-bytes)] from torch.profiler's [memory] events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = prof.profiler.kineto_results.events()
    return result, sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")


def held_bytes(fn) -> int:
    """Bytes allocated by fn() and still held when it returns (its result kept alive meanwhile)."""
    result, records = _allocations(fn)
    del result
    return sum(n for _, n in records)


def peak_bytes(fn) -> int:
    """High-water mark of allocator bytes during fn(), above the level before it."""
    _, records = _allocations(fn)
    live = peak = 0
    for _, n in records:
        live += n
        peak = max(peak, live)
    return peak


def branch_case(routing_unit: str, micro: int, dtype: torch.dtype, recompute: bool):
    from moc_megatron.config import load_config
    from moc_megatron.model.gpt import MemoryBranch
    from moc_megatron.model.memory import MemoryBank
    from moc_megatron.parallel.state import single_process

    memory = {"routing_unit": routing_unit, "routing_chunk": 128} if routing_unit == "chunk" else {}
    memory["recompute_kv"] = recompute
    cfg = load_config(str(REPO / "configs/models/moc-paper.yaml"), memory=memory,
                      training=dict(seq_length=1024)).validate()
    ctx = single_process()
    branch, bank = MemoryBranch(ctx, cfg).to(dtype), MemoryBank(cfg, 0.02).to(dtype)
    torch.nn.init.normal_(branch.memory_attn.o_proj.weight, std=0.02)
    g = torch.Generator().manual_seed(0)
    d = cfg.model.hidden_size
    h = torch.randn(micro, 1024, d, generator=g).to(dtype).requires_grad_()
    h_in = torch.randn(micro, 1024, d, generator=g).to(dtype).requires_grad_()

    def forward():
        out, _ = branch(h, h_in, bank, None)
        return out

    def step():
        forward().float().square().mean().backward()
        for p in [h, h_in, *branch.parameters(), *bank.parameters()]:
            p.grad = None

    return forward, step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/read_memory"))
    args = parser.parse_args(argv)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for recompute in (False, True):
            for unit in ("sequence", "chunk"):
                forward, step = branch_case(unit, args.micro_batch, dtype, recompute)
                held = held_bytes(forward)
                peak = peak_bytes(step)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "recompute_kv": recompute, "routing": unit,
                             "held_mib": held / 2**20, "peak_mib": peak / 2**20})
                print(rows[-1], flush=True)
    lines = ["| dtype | K/V | routing | held for backward (MiB) | fwd+bwd peak (MiB) | chunk / sequence (held) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        seq = next(r for r in rows if r["dtype"] == row["dtype"] and r["recompute_kv"] == row["recompute_kv"]
                   and r["routing"] == "sequence")
        kv = "recomputed" if row["recompute_kv"] else "kept"
        lines.append(f"| {row['dtype']} | {kv} | {row['routing']} | {row['held_mib']:.0f} | {row['peak_mib']:.0f} | "
                     f"{row['held_mib'] / seq['held_mib']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps({"micro_batch": args.micro_batch, "rows": rows}, indent=1)),
                         (".md", table + "\n")):
        Path(args.out + suffix + ".tmp").write_text(text)
        os.replace(args.out + suffix + ".tmp", args.out + suffix)


if __name__ == "__main__":
    main()
