"""Chapter attention, forward + backward on CPU: today's gather + SDPA path against the C++ kernel.

    python benchmarks/bench_chapter_attention.py [--quick] [--repeats R] [--threads N] [--reference]
                                                 [--json FILE]

Variants, each in its own process so that one cannot hide or inherit another's memory:
  gather_sdpa  k_g = chapter_gather(k_u, index, w), the same for v (tables (u, t, kv*e) -> (U, n, t, kv*e),
               viewed as (U, n*t, kv, e)), then scaled_dot_product_attention(enable_gqa=True); backward
               through all of it. The path the kernel replaces.
  cpp          moc_megatron.ops.chapter_attention under MOC_OPS_BACKEND=cpp: moc_megatron._C's kernel.
  reference    (--reference) the same under MOC_OPS_BACKEND=torch: the pure-torch blocked reference.
q, k, v and w require grad in every variant and the backward gets the same dout.

Time: wall clock of one forward + backward, median of R runs after a warm-up. The variants' runs
alternate, so a change in load (the CPU may be shared) hits them alike; the min is kept too, and the
process CPU time of each run (all threads), which load disturbs less.

Peak memory: growth of the process's peak RSS (getrusage ru_maxrss) over the first full-size forward +
backward. The worker first runs the variant on tiny shapes (thread pools, BLAS buffers, op
registration), then creates its inputs directly (no temporaries, so the high-water mark then equals
what is live), reads ru_maxrss, runs once and reads it again: the difference is what the path itself
allocates at its peak (outputs, saved tensors, gradients, intermediates), inputs excluded.
tracemalloc cannot see torch's allocations.

Default shapes are the paper's memory layer: U=4 units, c=1024 queries, h=kv=12 heads of e=64,
n=65 slots of t=64 tokens, u=260 distinct table rows, float32. Letters as in moc_megatron/ops/attention.py.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAPER = dict(U=4, c=1024, h=12, kv=12, e=64, n=65, t=64, u=260)
QUICK = dict(U=2, c=128, h=4, kv=2, e=32, n=9, t=16, u=18)
TINY = dict(U=1, c=4, h=2, kv=1, e=8, n=2, t=4, u=2)
VARIANTS = ("gather_sdpa", "cpp", "reference")
RESULTS = Path(__file__).resolve().parent / "results" / "chapter_attention.json"


def _inputs(shape: dict, seed: int = 0):
    import torch

    U, c, h, kv, e, n, t, u = (shape[x] for x in ("U", "c", "h", "kv", "e", "n", "t", "u"))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(U, c, h, e, generator=gen).requires_grad_()
    k = torch.randn(u, t, kv, e, generator=gen).requires_grad_()
    v = torch.randn(u, t, kv, e, generator=gen).requires_grad_()
    index = torch.randperm(u, generator=gen)[: U * n].view(U, n).contiguous()  # distinct rows
    w = (torch.rand(U, n, generator=gen) + 0.5).requires_grad_()
    dout = torch.randn(U, c, h, e, generator=gen)
    return q, k, v, index, w, dout


def _step(variant: str, q, k, v, index, w, dout):
    """One forward + backward; returns the output (detached)."""
    import torch
    import torch.nn.functional as F

    import moc_megatron.ops as ops

    if variant == "gather_sdpa":
        (U, c, h, e), (u, t, kv, _) = q.shape, k.shape
        n = index.shape[1]
        k_g = ops.chapter_gather(k.view(u, t, kv * e), index, w).view(U, n * t, kv, e)
        v_g = ops.chapter_gather(v.view(u, t, kv * e), index, w).view(U, n * t, kv, e)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_g.transpose(1, 2), v_g.transpose(1, 2),
                                             enable_gqa=True).transpose(1, 2)
    else:
        os.environ["MOC_OPS_BACKEND"] = "cpp" if variant == "cpp" else "torch"
        out, _ = ops.chapter_attention(q, k, v, index, w)
    out.backward(dout)
    for x in (q, k, v, w):
        x.grad = None
    return out.detach()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(variant: str, shape: dict, threads: int | None) -> None:
    """Serves the parent over stdin / stdout: a JSON line with the peak memory, then one time per 'run'."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    _step(variant, *_inputs(TINY))  # warm-up: thread pools, BLAS buffers, op registration
    inputs = _inputs(shape)
    before = _peak_rss_mib()
    start = time.perf_counter()
    out = _step(variant, *inputs)
    first = time.perf_counter() - start
    print(json.dumps({"threads": torch.get_num_threads(), "first_s": first, "peak_mib": _peak_rss_mib() - before,
                      "out_abs_sum": out.abs().sum().item()}), flush=True)
    for _ in sys.stdin:
        start, cpu = time.perf_counter(), time.process_time()
        _step(variant, *inputs)
        print(json.dumps([time.perf_counter() - start, time.process_time() - cpu]), flush=True)


def measure(variants, shape: dict, repeats: int, threads: int | None) -> dict:
    """One worker process per variant; timed runs alternate between them, so load changes hit all alike."""
    procs, records = {}, {}
    for name in variants:
        cmd = [sys.executable, __file__, "--worker", name, "--shape", json.dumps(shape)]
        if threads:
            cmd += ["--threads", str(threads)]
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        records[name] = {"variant": name, **json.loads(_reply(procs[name], name)), "times_s": [], "cpu_s": []}
    for _ in range(repeats):
        for name, proc in procs.items():
            proc.stdin.write("run\n")
            proc.stdin.flush()
            wall, cpu = json.loads(_reply(proc, name))
            records[name]["times_s"].append(wall)
            records[name]["cpu_s"].append(cpu)
    for name, proc in procs.items():
        proc.stdin.close()
        proc.wait()
        r = records[name]
        r.update(median_s=statistics.median(r["times_s"]), min_s=min(r["times_s"]),
                 median_cpu_s=statistics.median(r["cpu_s"]))
    return records


def _reply(proc: subprocess.Popen, name: str) -> str:
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the {name} worker failed (exit {proc.wait()})")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small shapes {QUICK}")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reference", action="store_true", help="also time the pure-torch reference")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    if args.worker:
        worker(args.worker, args.shape, args.threads)
        return
    shape = QUICK if args.quick else PAPER
    records = measure(VARIANTS if args.reference else VARIANTS[:2], shape, repeats, args.threads)
    base = records["gather_sdpa"]
    print(f"chapter attention fwd+bwd, float32, {shape}, {base['threads']} threads, median of {repeats}")
    print(f"{'variant':<12} {'median s':>9} {'min s':>8} {'cpu s':>7} {'peak MiB':>9} {'speedup':>8} {'memory':>7}")
    for name, r in records.items():
        r["speedup_vs_gather_sdpa"] = base["median_s"] / r["median_s"]
        r["memory_vs_gather_sdpa"] = r["peak_mib"] / base["peak_mib"]
        print(f"{name:<12} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['median_cpu_s']:7.3f} {r['peak_mib']:9.1f} "
              f"{r['speedup_vs_gather_sdpa']:7.2f}x {r['memory_vs_gather_sdpa']:6.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"shape": shape, "dtype": "float32", "repeats": repeats,
                                     "results": records}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
