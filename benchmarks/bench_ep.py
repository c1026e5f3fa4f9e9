"""Chapter parallelism at the same number of ranks: step time and peak memory at EP=1 against EP=2.

Each case trains for a few steps through the real launcher (torchrun, gloo, 2 ranks) with the same
global batch; only --expert-model-parallel-size changes. Reported per case and EP:
  - step time: the median of the logged per-step iteration times after the first (warm-up) step;
  - peak memory per rank: the largest VmHWM (peak resident set) of the rank processes, read from
    /proc while they run; on a GPU the trainer's own log is the better figure.
Targets (issue #13): EP=2 at most 1.15x EP=1's step time; moc-paper's EP=2 peak at least 0.5 GiB below EP=1's.

    python benchmarks/bench_ep.py                      # all cases (about 15 minutes on 2 cores)
    python benchmarks/bench_ep.py --cases tiny-chunk tiny-sequence --steps 20
Writes benchmarks/results/bench_ep.{json,md}.
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
TINY = ["--config", "configs/train/moc-tiny.yaml", "--eval-interval", "0", "--seq-length", "128",
        "--micro-batch-size", "4", "--global-batch-size", "8"]
PAPER = ["--config", "configs/train/moc-paper-pretrain.yaml", "--mock-data", "--micro-batch-size", "1",
         "--global-batch-size", "2", "--eval-interval", "0"]
CASES = {
    "tiny-chunk": (TINY + ["--memory-routing-unit", "chunk", "--memory-routing-chunk", "32", "--no-bf16"], 30),
    "tiny-sequence": (TINY + ["--memory-routing-unit", "sequence", "--no-bf16"], 30),
    "paper-fp32": (PAPER + ["--no-bf16"], 3),
    "paper-bf16": (PAPER + ["--bf16"], 3),
}


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _hwm_kib(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_case(args: list[str], ep: int, steps: int, nproc: int = 2) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ep-") as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_port()), "-m", "moc_megatron.train", *args, "--expert-model-parallel-size", str(ep),
               "--train-iters", str(steps), "--lr-warmup-iters", "1", "--log-interval", "1", "--log-jsonl", log]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            for child in _children(proc.pid):
                peaks[child] = max(peaks.get(child, 0), _hwm_kib(child))
            time.sleep(0.5)
        output = proc.stdout.read()
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
        records = [json.loads(line) for line in open(log) if '"iter_time"' in line]
    times = [r["iter_time"] for r in records][1:] or [r["iter_time"] for r in records]
    rss = sorted(peaks.values(), reverse=True)[:nproc]
    return {"ep": ep, "steps": steps, "step_s": statistics.median(times), "step_times": times,
            "tokens_per_s": statistics.median(r["tokens_per_sec"] for r in records[1:] or records),
            "loss": records[-1].get("lm_loss"), "peak_rss_gib_per_rank": [k / 2**20 for k in rss]}


def _port() -> int:
    sys.path.insert(0, str(REPO))
    from moc_megatron.parallel.net import free_port

    return free_port()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: per case)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_ep"))
    args = parser.parse_args(argv)
    results = {}
    for name in args.cases:
        flags, steps = CASES[name]
        results[name] = [run_case(flags, ep, args.steps or steps) for ep in (1, 2)]
        one, two = results[name]
        print(f"{name}: EP=1 {one['step_s']:.3f} s/step, EP=2 {two['step_s']:.3f} s/step "
              f"({two['step_s'] / one['step_s']:.2f}x); peak/rank {max(one['peak_rss_gib_per_rank']):.2f} vs "
              f"{max(two['peak_rss_gib_per_rank']):.2f} GiB", flush=True)
    lines = ["| case | EP=1 s/step | EP=2 s/step | EP=2 / EP=1 | EP=1 peak GiB/rank | EP=2 peak GiB/rank | "
             "EP=2 - EP=1 GiB |", "|---|---|---|---|---|---|---|"]
    for name, (one, two) in results.items():
        p1, p2 = max(one["peak_rss_gib_per_rank"]), max(two["peak_rss_gib_per_rank"])
        lines.append(f"| {name} | {one['step_s']:.3f} | {two['step_s']:.3f} | {two['step_s'] / one['step_s']:.2f}x | "
                     f"{p1:.2f} | {p2:.2f} | {p2 - p1:+.2f} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(results, indent=1)), (".md", table + "\n")):
        tmp = args.out + suffix + ".tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, args.out + suffix)


if __name__ == "__main__":
    main()
