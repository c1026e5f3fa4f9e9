"""What a user sees: a progress line per log interval (rank 0), a JSON line per logged iteration and
evaluation (--log-jsonl), TensorBoard scalars and chapter-usage histograms (--tensorboard-dir).

Losses, lr and grad norm are those of the logged iteration (averaged over its micro-batches and the
data-parallel ranks); rates cover the steps since the previous log, evaluation and saving left out.
Throughput: tokens/s of the whole run; TFLOP/s per device from the FLOPs estimator (SPEC 1.6, fwd + bwd
per sequence); MFU = that / --peak-tflops (default: the device's known dense bf16/tf32 peak; none on CPU).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moc_megatron.accounting import estimate_flops
from moc_megatron.config import Config
from moc_megatron.training.step import StepResult

# Dense peak TFLOP/s per device: (bf16, tf32). Matched in order against torch.cuda.get_device_name().
KNOWN_PEAKS = (("H200", 989.4, 494.7), ("H100 PCIe", 756.0, 378.0), ("H100", 989.4, 494.7),
               ("A100", 312.0, 156.0), ("L40S", 362.1, 183.0), ("A10", 125.0, 62.5), ("V100", 125.0, 15.7))


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


def warn0(msg: str) -> None:
    if is_rank0():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def device_peak_tflops(cfg: Config) -> float | None:
    if cfg.training.peak_tflops:
        return cfg.training.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, bf16, tf32 in KNOWN_PEAKS:
        if key in name:
            return bf16 if cfg.training.bf16 else tf32
    return None


@dataclass
class Throughput:
    """Rates over the current log interval, and elapsed time / ETA over the run."""

    cfg: Config
    world_size: int
    start_iteration: int
    flops_per_seq: float = 0.0
    peak: float | None = None
    t0: float = field(default_factory=time.perf_counter)
    t_mark: float = 0.0
    it_mark: int = 0

    def __post_init__(self):
        self.flops_per_seq = estimate_flops(self.cfg, self.cfg.training.seq_length).total_flops
        self.peak = device_peak_tflops(self.cfg)
        self.t_mark, self.it_mark = self.t0, self.start_iteration

    def exclude(self, seconds: float) -> None:
        """Leave evaluation and checkpoint time out of the interval's rates (not out of elapsed)."""
        self.t_mark += seconds

    def interval(self, iteration: int) -> dict:
        t = self.cfg.training
        now = time.perf_counter()
        steps, dt = iteration - self.it_mark, max(now - self.t_mark, 1e-9)
        self.t_mark, self.it_mark = now, iteration
        seqs = steps * t.global_batch_size
        tflops = seqs * self.flops_per_seq / dt / self.world_size / 1e12
        elapsed = now - self.t0
        done = max(iteration - self.start_iteration, 1)
        return {"tokens_per_sec": seqs * t.seq_length / dt, "tflops_per_device": tflops,
                "mfu": tflops / self.peak if self.peak else None, "iter_time": dt / max(steps, 1),
                "elapsed": elapsed, "eta": elapsed / done * (t.train_iters - iteration)}


def router_summary(router: list, count: int, cfg: Config, dp_group) -> list[dict]:
    """Per memory layer over the interval's last step, all data-parallel ranks: entropy (mean), fraction
    of routed chapters used, max / min chapter load (1 = uniform), usage counts (c,) on the CPU. Reduced
    on the device the statistics live on (NCCL reduces no CPU tensor)."""
    if not router:
        return []
    n_shared = cfg.memory.shared_chapters
    usage = torch.stack([r["usage"] for r in router]).double()          # (layers, c)
    entropy = torch.stack([r["entropy"] for r in router]).double() / count
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(usage, group=dp_group)
        dist.all_reduce(entropy, group=dp_group)
        entropy /= dist.get_world_size(dp_group)
    routed = usage[:, n_shared:]
    load = routed / routed.mean(1, keepdim=True).clamp(min=1e-12)
    return [{"layer": layer, "entropy": entropy[i].item(), "chapters_used": (routed[i] > 0).double().mean().item(),
             "max_load": load[i].max().item(), "min_load": load[i].min().item(), "usage": usage[i].long().cpu()}
            for i, layer in enumerate(cfg.memory.layers)]


def progress_line(rec: dict, train_iters: int) -> str:
    def num(key, fmt):
        return "n/a" if rec.get(key) is None else format(rec[key], fmt)

    parts = [f"iter {rec['iteration']}/{train_iters}", f"loss {num('loss', '.4f')}", f"lm {num('lm_loss', '.4f')}"]
    if rec.get("load_balance_loss") is not None:
        parts += [f"lb {num('load_balance_loss', '.4f')}", f"z {num('z_loss', '.3f')}"]
    parts += [f"lr {num('lr', '.3e')}", f"grad {num('grad_norm', '.3f')}",
              f"{rec['tokens_per_sec']:,.0f} tok/s", f"{rec['tflops_per_device']:.3g} TFLOP/s",
              f"MFU {'n/a' if rec['mfu'] is None else format(rec['mfu'], '.1%')}",
              f"{_hms(rec['elapsed'])} elapsed, ETA {_hms(rec['eta'])}"]
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']}")
    return " | ".join(parts)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def step_record(res: StepResult, rates: dict, skipped_steps: int) -> dict:
    """The JSON line of a logged iteration (lr: the backbone's)."""
    return {"iteration": res.iteration, "loss": res.loss, "lm_loss": res.lm_loss,
            "load_balance_loss": res.load_balance_loss, "z_loss": res.z_loss,
            "lr": res.lrs.get("backbone"), "lrs": res.lrs, "grad_norm": res.grad_norm, "skipped": res.skipped,
            "skipped_steps": skipped_steps, **rates}


class Reporter:
    """Rank 0's sinks: stdout, the JSONL file and TensorBoard. Other ranks hold no files."""

    def __init__(self, cfg: Config):
        self.cfg, self.jsonl, self.tb = cfg, None, None
        if not is_rank0():
            return
        t = cfg.training
        if t.log_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(t.log_jsonl)), exist_ok=True)
            self.jsonl = open(t.log_jsonl, "a")
        if t.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(t.tensorboard_dir)

    def log_step(self, rec: dict, router: list[dict]) -> None:
        if not is_rank0():
            return
        print(progress_line(rec, self.cfg.training.train_iters), flush=True)
        self._write(rec)
        if self.tb:
            self._tensorboard_step(rec, router)

    def log_eval(self, rec: dict) -> None:
        if not is_rank0():
            return
        print(f"eval at iter {rec['iteration']} | lm loss {rec['eval_lm_loss']:.4f} | "
              f"loss {rec['eval_loss']:.4f} | ppl {rec['eval_ppl']:.3f}", flush=True)
        self._write(rec)
        if self.tb:
            for key in ("eval_lm_loss", "eval_loss", "eval_ppl"):
                self.tb.add_scalar(f"eval/{key[5:]}", rec[key], rec["iteration"])

    def _write(self, rec: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()

    def _tensorboard_step(self, rec: dict, router: list[dict]) -> None:
        it, tb = rec["iteration"], self.tb
        for key in ("loss", "lm_loss", "load_balance_loss", "z_loss", "grad_norm"):
            if rec.get(key) is not None:
                tb.add_scalar(f"train/{key}", rec[key], it)
        for name, lr in rec["lrs"].items():
            tb.add_scalar(f"lr/{name}", lr, it)
        for key in ("tokens_per_sec", "tflops_per_device", "mfu", "iter_time"):
            if rec.get(key) is not None:
                tb.add_scalar(f"perf/{key}", rec[key], it)
        for r in router:
            tag = f"router/layer{r['layer']}"
            for key in ("entropy", "chapters_used", "max_load", "min_load"):
                tb.add_scalar(f"{tag}/{key}", r[key], it)
            _usage_histogram(tb, f"{tag}/chapter_usage", r["usage"], it)
        tb.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _usage_histogram(tb, tag: str, usage: torch.Tensor, it: int) -> None:
    """Bucket i = how often chapter i was read in the step (x axis: chapter id). On the CPU, where the
    ids are and where TensorBoard wants the numbers, whatever device the counts come from."""
    counts = usage.detach().double().cpu()
    ids = torch.arange(counts.numel(), dtype=torch.float64)
    total = counts.sum().item()
    if total == 0:
        return
    tb.add_histogram_raw(tag, min=0.0, max=float(counts.numel() - 1), num=total,
                         sum=(ids * counts).sum().item(), sum_squares=(ids * ids * counts).sum().item(),
                         bucket_limits=(ids + 0.5).tolist(), bucket_counts=counts.tolist(), global_step=it)
