"""Chapter gather / scatter / unique: compiled (cpp) vs pure-torch path, on CPU.

    python benchmarks/bench_chapter_ops.py [--json FILE] [--repeats R] [--threads N]

Times go through the public moc_megatron.ops functions (what the model calls), with MOC_OPS_BACKEND
switching the path; each entry is the fastest of R runs after a warm-up (the least disturbed by other
load, as timeit advises), the two paths alternating; the JSON also keeps the medians.
Outputs are freshly allocated each call, as in training, so large tables pay for page faults. Letters: u table rows,
t tokens per chapter, d width, b*n selected rows.
"""

import argparse
import json
import os
import statistics
import time

import torch

import moc_megatron.ops as ops
from moc_megatron.ops import _backend

TABLE_ROWS = (64, 512, 4096)
SELECTED = (64, 512)
T, D = 64, 128


def _compare_ms(fn, backends: list[str], repeats: int) -> dict[str, list[float]]:
    """ms per run per backend; the backends alternate run by run so load changes hit both alike."""
    times, before = {name: [] for name in backends}, os.environ.get(_backend.ENV_VAR)
    for rep in range(repeats + 1):
        for name in backends:
            os.environ[_backend.ENV_VAR] = name
            start = time.perf_counter()
            fn()
            if rep > 0:  # run 0 warms up dispatch and the allocator
                times[name].append((time.perf_counter() - start) * 1e3)
    os.environ.pop(_backend.ENV_VAR)
    if before is not None:
        os.environ[_backend.ENV_VAR] = before
    return times


def _gather_fns(table, index, weight, grad) -> dict:
    # table (u, t, d), index (b, n), weight (b, n), grad (b, n, t, d)
    return {
        "gather": lambda: ops.chapter_gather(table, index, weight),
        "scatter": lambda: ops.chapter_scatter(grad, index, weight, table.shape[0]),
        "weight_grad": lambda: ops.chapter_weight_grad(grad, table, index),
    }


def _gather_cases(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    for u in TABLE_ROWS:
        table = torch.randn(u, T, D, generator=gen).to(dtype)
        for rows in SELECTED:
            b, n = rows // 8, 8  # (b, n) with b * n selected rows
            index = torch.randint(0, u, (b, n), generator=gen)
            weight = torch.rand(b, n, generator=gen).to(dtype)
            grad = torch.randn(b, n, T, D, generator=gen).to(dtype)
            yield {"u": u, "rows": rows}, _gather_fns(table, index, weight, grad)


def _unique_cases():
    gen = torch.Generator().manual_seed(1)
    for b in (8, 64, 256):
        chapters = torch.randint(0, 4097, (b, 65), generator=gen)  # paper: 4097 chapters, 1 shared + top-64
        yield {"u": 4097, "rows": b * 65}, {"unique": lambda c=chapters: ops.unique_chapters(c)}


def run(repeats: int) -> list[dict]:
    backends = ["cpp", "torch"] if _backend.EXTENSION is not None else ["torch"]
    cases = [(torch.float32, c) for c in _gather_cases(torch.float32)]
    cases += [(torch.bfloat16, c) for c in _gather_cases(torch.bfloat16)]
    cases += [(torch.int64, c) for c in _unique_cases()]
    records = []
    for dtype, (size, fns) in cases:
        for op, fn in fns.items():
            times = _compare_ms(fn, backends, repeats)
            records.append({"op": op, "dtype": str(dtype).removeprefix("torch."), **size, "t": T, "d": D,
                            **{f"{name}_ms": round(min(ts), 4) for name, ts in times.items()},
                            **{f"{name}_median_ms": round(statistics.median(ts), 4) for name, ts in times.items()}})
    return records


def print_table(records: list[dict]) -> None:
    print(f"{'op':<12}{'dtype':<10}{'u':>6}{'b*n':>7}{'cpp ms':>10}{'torch ms':>10}{'speedup':>9}")
    for r in records:
        cpp = r.get("cpp_ms", float("nan"))
        print(f"{r['op']:<12}{r['dtype']:<10}{r['u']:>6}{r['rows']:>7}{cpp:>10.3f}{r['torch_ms']:>10.3f}"
              f"{r['torch_ms'] / cpp:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, backend() = {ops.backend()}, t={T}, d={D}")
    records = run(args.repeats)
    print_table(records)
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
