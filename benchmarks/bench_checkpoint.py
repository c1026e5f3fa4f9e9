"""What a checkpoint costs at the paper's size: save and load time and bytes, against plain torch.save.

moc-paper (configs/train/moc-paper-pretrain.yaml, ZeRO 1) in fp32 at 1 process and at EP=2 on 2 ranks,
and in bf16 (weights in bf16, fp32 masters stored beside them) at EP=2, through the real code: the
trainer builds the engine, checkpoint.save writes iter_N (model/ and optim/ by
torch.distributed.checkpoint, RNG, metadata, fsync, rename), resume.load reads it back into the running
engine. The baseline writes the same tensors with torch.save: each rank saves exactly the tensors DCP
gave its file (read from the checkpoint's metadata), then fsyncs, as the checkpoint does.

    python benchmarks/bench_checkpoint.py                   # all three cases (about 8 minutes on 2 cores)
    python benchmarks/bench_checkpoint.py --cases ep2 --repeats 3
Target (issue #15): save time at most 1.5x the baseline's. No async save is offered.
Writes benchmarks/results/bench_checkpoint.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = ["--config", "configs/train/moc-paper-pretrain.yaml", "--mock-data", "--micro-batch-size", "1",
         "--global-batch-size", "2", "--eval-interval", "0", "--zero-stage", "1"]
CASES = {"1proc": (1, 1, False), "ep2": (2, 2, False), "ep2-bf16": (2, 2, True)}  # name: (ranks, EP, bf16)


def worker(args) -> None:
    """One rank: build, save `repeats` times, write the baseline, load into the same engine; rank 0 reports."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from moc_megatron.config import parse_config
    from moc_megatron.training import checkpoint, resume
    from moc_megatron.training.trainer import assemble, setup

    root = args.dir
    cfg = parse_config([*PAPER, "--bf16" if args.bf16 else "--no-bf16", "--expert-model-parallel-size", str(args.ep),
                        "--save", root, "--load", root])
    ctx, ds = setup(cfg)
    cfg.training.load = None  # build without loading; load is timed below
    run = assemble(cfg, ctx, ds)
    cfg.training.load = root
    rank = dist.get_rank()
    saves, baselines, loads = [], [], []
    path = None
    for i in range(args.repeats):
        # save and baseline back to back, in turns first (the disk's speed drifts), compared in pairs
        if i % 2:
            baselines.append(_baseline(run, cfg, ctx, path, rank, root))
        _settle()
        t0 = time.perf_counter()
        path = checkpoint.save(run.engine, run.scheduler, cfg, ctx, i + 1, 2 * (i + 1))
        saves.append(time.perf_counter() - t0)
        if not i % 2:
            baselines.append(_baseline(run, cfg, ctx, path, rank, root))
        _settle()
        t0 = time.perf_counter()
        resume.load(run.engine, run.scheduler, cfg, ctx)
        dist.barrier()
        loads.append(time.perf_counter() - t0)
    sizes = _bytes(path)
    if rank == 0:
        peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
        params = sum(p.numel() for p in run.engine.module.parameters())
        json.dump({"ranks": dist.get_world_size(), "ep": args.ep, "bf16": args.bf16, "parameters_rank0": params,
                   "save_s": saves, "baseline_save_s": [b["save"] for b in baselines],
                   "baseline_load_s": [b["load"] for b in baselines], "load_s": loads,
                   "checkpoint_bytes": sizes, "baseline_bytes": baselines[-1]["bytes"], "peak_rss_rank0": peak},
                  open(args.result, "w"), indent=1)
    dist.barrier()
    torch.distributed.destroy_process_group()


def _baseline(run, cfg, ctx, path: str, rank: int, root: str) -> dict:
    """torch.save of the tensors DCP put in this rank's files, then fsync; and torch.load of them back."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemReader

    from moc_megatron.training.dist_state import MODEL, OPTIM, Chunks, state_dicts

    tensors = {}
    for kind, state in zip((MODEL, OPTIM), state_dicts(run.engine, cfg, ctx)):
        meta = FileSystemReader(os.path.join(path, kind)).read_metadata()
        for idx, info in meta.storage_data.items():
            if info.relative_path.startswith(f"__{rank}_"):
                obj = state[idx.fqn]
                obj = obj.box(idx.offset) if isinstance(obj, Chunks) else obj
                tensors[f"{idx.fqn}@{tuple(idx.offset or ())}"] = obj
    # views (ZeRO keeps weights and states in flat buffers) would make torch.save write the whole buffer
    tensors = {k: v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
               for k, v in tensors.items()}
    f = os.path.join(root, f"baseline_rank{rank}.pt")
    _settle()
    t0 = time.perf_counter()
    torch.save(tensors, f)
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    dist.barrier()
    save = time.perf_counter() - t0
    _settle()
    t0 = time.perf_counter()
    torch.load(f, map_location="cpu", weights_only=True)
    dist.barrier()
    load = time.perf_counter() - t0
    total = torch.tensor([os.path.getsize(f)], dtype=torch.int64)
    dist.all_reduce(total)
    os.remove(f)
    return {"save": save, "load": load, "bytes": int(total)}


def _settle() -> None:
    """Every timed write or read starts with no dirty pages left by the one before (they would be
    written back during it), on every rank at once."""
    import torch.distributed as dist

    os.sync()
    dist.barrier()


def _bytes(path: str) -> dict:
    out = {}
    for folder, _, names in os.walk(path):
        kind = os.path.relpath(folder, path).split(os.sep)[0]
        kind = "other" if kind == "." else kind
        out[kind] = out.get(kind, 0) + sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    return out


def run_case(name: str, repeats: int) -> dict:
    nproc, ep, bf16 = CASES[name]
    with tempfile.TemporaryDirectory(prefix="moc-bench-ckpt-", dir=os.environ.get("MOC_BENCH_DIR")) as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_port()), __file__, "--worker", "--ep", str(ep), *(["--bf16"] if bf16 else []),
               "--dir", os.path.join(tmp, "ckpt"),
               "--result", result, "--repeats", str(repeats)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out = json.load(open(result))
    out["case"] = name
    return out


def _port() -> int:
    from moc_megatron.parallel.net import free_port

    return free_port()


def table(results: list[dict]) -> str:
    rows = ["| case | parameters (rank 0) | checkpoint | torch.save bytes | save | torch.save | ratio | load | "
            "torch.load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        save, base = statistics.median(r["save_s"]), statistics.median(r["baseline_save_s"])
        ratio = statistics.median(a / b for a, b in zip(r["save_s"], r["baseline_save_s"]))
        gib = sum(r["checkpoint_bytes"].values()) / 2**30
        rows.append(f"| moc-paper {r['case']} ({r['ranks']} rank{'s' * (r['ranks'] > 1)}, EP {r['ep']}, "
                    f"{'bf16' if r.get('bf16') else 'fp32'}) | "
                    f"{r['parameters_rank0'] / 1e6:.0f}M | {gib:.2f} GiB | {r['baseline_bytes'] / 2**30:.2f} GiB | "
                    f"{save:.1f} s | {base:.1f} s | **{ratio:.2f}x** | {statistics.median(r['load_s']):.1f} s | "
                    f"{statistics.median(r['baseline_load_s']):.1f} s |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_checkpoint"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    results = [run_case(c, args.repeats) for c in args.cases]
    md = (f"# Checkpoint cost at moc-paper (ZeRO 1)\n\n{table(results)}\n\nMedians of {args.repeats} saves and "
          "loads; ratio: the median of each save over the torch.save timed next to it (in turns first). "
          "save: checkpoint.save (each rank's own ZeRO ranges and weights, DCP write, RNG, metadata, fsync, rename); "
          "torch.save: the same tensors per rank, fsynced. load: resume.load into the running engine. Target: "
          "save at most 1.5x torch.save.\n")
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out + ".json.tmp"
    json.dump(results, open(tmp, "w"), indent=1)
    os.replace(tmp, args.out + ".json")
    with open(args.out + ".md.tmp", "w") as f:
        f.write(md)
    os.replace(args.out + ".md.tmp", args.out + ".md")


if __name__ == "__main__":
    main()
