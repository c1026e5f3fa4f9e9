#!/usr/bin/env python
"""GPU benchmark of moc-megatron on one device: training step, chapter gather / scatter, chapter attention.

    python benchmarks/gpu/bench_gpu.py --out bench_gpu.json [--micro-batch 8] [--steps 10] [--budget 150]
    python benchmarks/gpu/bench_gpu.py --device cpu --quick --out /tmp/bench.json   # smoke test of this script

Parts, each bounded in time, the JSON rewritten after each (benchmarks/gpu/README.md):
  ops        chapter_gather / chapter_scatter at a moc-paper memory layer's shapes (table (260, 64, 768) bf16,
             index (4, 65)), extension and torch path: time per call (host included) and of the kernels alone
             (profiler), GB/s against the device's HBM bandwidth.
  attention  chapter_attention forward and forward+backward (U=4, c=1024, h=12, e=64, 65 chapters x 64 tokens, bf16)
             against torch SDPA (flash) over a dense K/V of the same 4160 keys: TFLOP/s and the ratio.
  train      moc-paper and the iso-FLOP vanilla at seq 1024, bf16, one GPU, through the trainer (DeepSpeed ZeRO-1,
             mock data), each in a fresh process: step time, tokens/s, TFLOP/s and MFU by the FLOPs estimator
             (SPEC count, as the trainer logs it), peak memory. If the engine fails, a plain torch loop
             (bf16 weights, fused AdamW) is timed instead and marked so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

HBM_TBPS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100", 2.0), ("L40S", 0.864))  # TB/s, by name
TRAIN = {"full": (("moc-paper", 1024), ("vanilla-iso-flop", 1024)), "quick": (("moc-tiny", 64), ("vanilla-tiny", 64))}
OPS_SHAPE = {"full": dict(u=260, t=64, d=768, b=4, n=65), "quick": dict(u=17, t=16, d=32, b=2, n=5)}
ATTN_SHAPE = {"full": dict(U=4, c=1024, h=12, kv=12, e=64, n=65, t=64, u=260),
              "quick": dict(U=2, c=64, h=4, kv=2, e=16, n=5, t=16, u=9)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu/bench_gpu.json"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny shapes and configs (the CPU smoke test)")
    p.add_argument("--parts", default="ops,attention,train")
    p.add_argument("--micro-batch", type=int, default=None, help="training micro-batch (default 8; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps (default 3; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 10; quick 2)")
    p.add_argument("--iters", type=int, default=None, help="timed kernel calls (default 20; quick 3)")
    p.add_argument("--budget", type=float, default=150.0, help="seconds for the whole run; parts left are skipped")
    p.add_argument("--train-timeout", type=float, default=75.0, help="seconds for one training process")
    p.add_argument("--train-child", help=argparse.SUPPRESS)  # config name: time training steps, print RESULT json
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--engine", default="deepspeed", choices=("deepspeed", "plain"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("micro_batch", 8, 2), ("warmup", 3, 1), ("steps", 10, 2), ("iters", 20, 3)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --quick for the smoke test)")
    return args


# ---------------------------------------------------------------------------------------------
# timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device: str, iters: int, warmup: int = 3) -> float:
    """Median milliseconds per call, the host's launch overhead included (CUDA events on the stream)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_ms(fn, device: str, iters: int) -> float | None:
    """Milliseconds of GPU kernels per call (torch.profiler), without the host's gaps; None off CUDA."""
    if device != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            sync(device)
        # kernels only: a CPU op's device time is its kernels' again
        total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()
                       if getattr(e, "device_type", None) == DeviceType.CUDA)
    except Exception as err:  # noqa: BLE001 - the per-call time stands without it
        print(f"warning: profiler failed ({type(err).__name__}: {err}); no kernel times", file=sys.stderr)
        return None
    return total_us / iters / 1e3 if total_us > 0 else None


def device_info(device: str) -> dict:
    import moc_megatron.ops as ops
    from moc_megatron.ops import _backend

    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "ops_backend": ops.backend(),
            "attention_kernels": getattr(_backend.attention_kernels(torch.device(device)), "__name__", "reference")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        info.update(name=name, capability=".".join(map(str, torch.cuda.get_device_capability())),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    hbm_tbps=next((bw for key, bw in HBM_TBPS if key in name), None))
    return info


# ---------------------------------------------------------------------------------------------
# chapter gather / scatter


def bench_ops(args, device: str, shape: dict, hbm_tbps: float | None) -> list[dict]:
    import moc_megatron.ops as ops
    from moc_megatron.ops import _backend

    u, t, d, b, n = (shape[k] for k in "utdbn")
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    table = torch.randn(u, t, d, generator=g).to(device, dtype)
    routed = torch.stack([torch.randperm(u - 1, generator=g)[: n - 1] + 1 for _ in range(b)])
    index = torch.cat([torch.zeros(b, 1, dtype=torch.int64), routed], 1).to(device)  # shared chapter 0 first
    weight = (torch.rand(b, n, generator=g) + 0.5).to(device, dtype)
    grad = torch.randn(b, n, t, d, generator=g).to(device, dtype)
    size = dtype.itemsize
    moved = {"gather": 2 * b * n * t * d * size, "scatter": (b * n + u) * t * d * size}  # bytes read + written
    calls = {"gather": lambda: ops.chapter_gather(table, index, weight),
             "scatter": lambda: ops.chapter_scatter(grad, index, weight, u)}
    compiled = _backend.EXTENSION is not None and (device == "cpu" or bool(_backend.EXTENSION.with_cuda))
    rows = []
    for backend in ("cpp", "torch"):
        if backend == "cpp" and not compiled:
            rows.append({"op": "gather/scatter", "backend": backend, "error": f"moc_megatron._C has no {device} kernels"})
            continue
        os.environ[_backend.ENV_VAR] = backend
        try:
            for op, fn in calls.items():
                per_call = time_calls(fn, device, args.iters)
                kernels = kernel_ms(fn, device, args.iters)
                row = {"op": op, "backend": backend, "shape": f"table ({u}, {t}, {d}) bf16, index ({b}, {n})",
                       "bytes": moved[op], "ms_per_call": per_call, "gbps_per_call": moved[op] / per_call / 1e6,
                       "kernel_ms": kernels, "gbps_kernels": moved[op] / kernels / 1e6 if kernels else None}
                if hbm_tbps:
                    row["hbm_fraction_kernels"] = row["gbps_kernels"] / (hbm_tbps * 1e3) if kernels else None
                    row["hbm_fraction_per_call"] = row["gbps_per_call"] / (hbm_tbps * 1e3)
                rows.append(row)
        finally:
            os.environ.pop(_backend.ENV_VAR, None)
    return rows


# ---------------------------------------------------------------------------------------------
# chapter attention against SDPA


def bench_attention(args, device: str, shape: dict) -> dict:
    import torch.nn.functional as F

    import moc_megatron.ops as ops

    U, c, h, kv, e, n, t, u = (shape[k] for k in ("U", "c", "h", "kv", "e", "n", "t", "u"))
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(U, c, h, e, generator=g).to(device, dtype)
    k, v = (x.to(device, dtype) for x in torch.randn(2, u, t, kv, e, generator=g))
    routed = torch.stack([torch.randperm(u - 1, generator=g)[: n - 1] + 1 for _ in range(U)])
    index = torch.cat([torch.zeros(U, 1, dtype=torch.int64), routed], 1).to(device)
    weight = (torch.rand(U, n, generator=g) + 0.5).to(device)
    keys = n * t
    fwd_flops = 4 * U * c * h * keys * e            # q.k and p.v
    fb_flops = 3.5 * fwd_flops                      # backward: 5 matmuls (dq, dk, dv, dp, recomputed s)
    gout = torch.randn(U, c, h, e, generator=g).to(device, dtype)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)] + [weight.clone().requires_grad_()]

    def chapter_fwd():
        with torch.no_grad():
            return ops.chapter_attention(q, k, v, index, weight)

    def chapter_fwd_bwd():
        out, _ = ops.chapter_attention(leaves[0], leaves[1], leaves[2], index, leaves[3])
        return torch.autograd.grad(out, leaves, gout)

    # dense baseline: the same queries over one K/V of `keys` tokens per unit, (U, heads, tokens, e)
    qd = q.transpose(1, 2).contiguous()
    kd, vd = (torch.randn(U, kv, keys, e, generator=g).to(device, dtype) for _ in range(2))
    dense = [x.detach().clone().requires_grad_() for x in (qd, kd, vd)]
    gd = gout.transpose(1, 2).contiguous()
    gqa = {"enable_gqa": True} if kv != h else {}

    def sdpa_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qd, kd, vd, **gqa)

    def sdpa_fwd_bwd():
        out = F.scaled_dot_product_attention(*dense, **gqa)
        return torch.autograd.grad(out, dense, gd)

    res = {"shape": dict(shape, keys=keys, dtype="bf16"), "fwd_gflop": fwd_flops / 1e9}
    res["chapter_fwd_ms"] = time_calls(chapter_fwd, device, args.iters)
    res["chapter_fwd_bwd_ms"] = time_calls(chapter_fwd_bwd, device, args.iters)
    res["sdpa_backend"] = "default"
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                res["sdpa_fwd_ms"] = time_calls(sdpa_fwd, device, args.iters)
                res["sdpa_fwd_bwd_ms"] = time_calls(sdpa_fwd_bwd, device, args.iters)
            res["sdpa_backend"] = "flash"
        except RuntimeError as err:  # no flash kernel for these inputs: the default choice, named as such
            res["sdpa_flash_error"] = str(err).splitlines()[0]
    if "sdpa_fwd_ms" not in res:
        res["sdpa_fwd_ms"] = time_calls(sdpa_fwd, device, args.iters)
        res["sdpa_fwd_bwd_ms"] = time_calls(sdpa_fwd_bwd, device, args.iters)
    for kind, flops in (("fwd", fwd_flops), ("fwd_bwd", fb_flops)):
        res[f"chapter_{kind}_tflops"] = flops / res[f"chapter_{kind}_ms"] / 1e9
        res[f"sdpa_{kind}_tflops"] = flops / res[f"sdpa_{kind}_ms"] / 1e9
        res[f"{kind}_ratio_vs_sdpa"] = res[f"sdpa_{kind}_ms"] / res[f"chapter_{kind}_ms"]  # target >= 0.6
    return res


# ---------------------------------------------------------------------------------------------
# training steps (child process)


def train_child(args) -> dict:
    from moc_megatron.accounting import estimate_flops, implemented_flops
    from moc_megatron.config import load_config
    from moc_megatron.training.metrics import device_peak_tflops

    device, B, S = args.device, args.micro_batch, args.seq
    bf16 = device == "cuda"
    cfg = load_config(str(ROOT / f"configs/models/{args.train_child}.yaml"), training=dict(
        seq_length=S, micro_batch_size=B, global_batch_size=B, train_iters=args.warmup + args.steps, lr=1e-4,
        min_lr=1e-5, lr_decay_style="constant", mock_data=True, bf16=bf16, log_interval=10**6, eval_interval=0,
        zero_stage=1))
    step, describe = (deepspeed_steps if args.engine == "deepspeed" else plain_steps)(cfg, device, B, S)
    losses = [step() for _ in range(args.warmup)]
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    spec = estimate_flops(cfg, S).total_flops
    impl = implemented_flops(cfg, S, B).total_flops
    peak = device_peak_tflops(cfg)
    tflops = B * spec / dt / 1e12
    return {"config": args.train_child, "engine": args.engine, "seq": S, "micro_batch": B, "bf16": bf16,
            "step_ms": dt * 1e3, "step_ms_all": [x * 1e3 for x in times], "tokens_per_s": B * S / dt,
            "tflops": tflops, "tflops_implemented": B * impl / dt / 1e12, "peak_tflops": peak,
            "mfu": tflops / peak if peak else None, "flops_per_seq_spec": spec, "flops_per_seq_implemented": impl,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "loss_first": losses[0], "loss_last": losses[-1],
            "finite": all(math.isfinite(x) for x in losses), **describe}


def deepspeed_steps(cfg, device, B, S):
    import moc_megatron.training.trainer as trainer

    run = trainer.build(cfg)
    return (lambda: trainer.one_step(run).loss), {"params": sum(p.numel() for p in run.engine.module.parameters())}


def plain_steps(cfg, device, B, S):
    from moc_megatron.model.gpt import MoCModel
    from moc_megatron.parallel.state import single_process

    cfg.validate()
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(cfg.training.seed)
    model = MoCModel(cfg, single_process()).to(device)
    if cfg.training.bf16:
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S + 1), device=device)

    def step():
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, {"params": sum(p.numel() for p in model.parameters())}


def run_train(args, name: str, seq: int, deadline: float) -> dict:
    """One config in a fresh process (its own world, memory peak and CUDA context); the plain loop if it fails."""
    errors = []
    for engine in ("deepspeed", "plain"):
        left = deadline - time.monotonic()
        if left < 15:
            errors.append(f"{engine}: no time left in --budget")
            break
        cmd = [sys.executable, str(Path(__file__).resolve()), "--train-child", name, "--seq", str(seq), "--engine", engine,
               "--device", args.device, "--micro-batch", str(args.micro_batch), "--warmup", str(args.warmup),
               "--steps", str(args.steps)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=min(args.train_timeout, left))
        except subprocess.TimeoutExpired as err:
            errors.append(f"{engine}: timed out after {err.timeout:.0f}s")
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            res = json.loads(lines[-1][len("RESULT "):])
            if errors:
                res["engine_errors"] = errors
            return res
        errors.append(f"{engine}: rc {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1][-400:])
    return {"config": name, "error": "; ".join(errors)}


# ---------------------------------------------------------------------------------------------
# report


def fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def table(results: dict) -> str:
    lines = [f"device: {results['env'].get('name', results['env']['device'])}; torch {results['env']['torch']}, "
             f"ops {results['env']['ops_backend']}, attention {results['env']['attention_kernels']}"]
    for r in results.get("train", []):
        if "error" in r:
            lines.append(f"train {r['config']:18s} ERROR {r['error']}")
            continue
        lines.append(f"train {r['config']:18s} {r['engine']:9s} mb {r['micro_batch']} x {r['seq']}: "
                     f"{r['step_ms']:8.2f} ms/step {r['tokens_per_s']:10.0f} tok/s {r['tflops']:7.1f} TFLOP/s "
                     f"MFU {fmt(r['mfu'], '.1%')} mem {fmt(r['max_memory_gib'], '.1f')} GiB loss {r['loss_last']:.3f}")
    if "train_step_ratio" in results:
        lines.append(f"moc / vanilla step time: {results['train_step_ratio']:.3f}")
    for r in results.get("ops", []):
        if "error" in r:
            lines.append(f"{r['op']:8s} {r['backend']:5s} ERROR {r['error']}")
            continue
        lines.append(f"{r['op']:8s} {r['backend']:5s} {r['ms_per_call'] * 1e3:8.1f} us/call "
                     f"{r['gbps_per_call']:8.1f} GB/s; kernels {fmt(r['kernel_ms'] and r['kernel_ms'] * 1e3, '.1f')} us "
                     f"{fmt(r['gbps_kernels'], '.1f')} GB/s = {fmt(r.get('hbm_fraction_kernels'), '.0%')} of HBM")
    a = results.get("attention")
    for kind in ("fwd", "fwd_bwd") if a else ():
        lines.append(f"attention {kind:7s} chapter {a[f'chapter_{kind}_ms']:8.3f} ms {a[f'chapter_{kind}_tflops']:7.1f} "
                     f"TFLOP/s | sdpa ({a['sdpa_backend']}) {a[f'sdpa_{kind}_ms']:8.3f} ms "
                     f"{a[f'sdpa_{kind}_tflops']:7.1f} TFLOP/s | ratio {a[f'{kind}_ratio_vs_sdpa']:.2f}")
    lines += [f"{part} ERROR {message}" for part, message in results.get("errors", {}).items()]
    lines += [f"{part} skipped: no time left in --budget" for part in results.get("skipped", [])]
    return "\n".join(lines)


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.train_child:
        print("RESULT " + json.dumps(train_child(args)), flush=True)
        return 0
    deadline = time.monotonic() + args.budget
    size = "quick" if args.quick else "full"
    out = Path(args.out)
    results = {"env": device_info(args.device), "args": {k: v for k, v in vars(args).items() if k != "train_child"}}
    parts = args.parts.split(",")
    for part in parts:
        if time.monotonic() > deadline - 5:
            results.setdefault("skipped", []).append(part)
            continue
        t0 = time.monotonic()
        try:
            if part == "ops":
                results["ops"] = bench_ops(args, args.device, OPS_SHAPE[size], results["env"].get("hbm_tbps"))
            elif part == "attention":
                results["attention"] = bench_attention(args, args.device, ATTN_SHAPE[size])
            elif part == "train":
                results["train"] = []
                for name, seq in TRAIN[size]:
                    results["train"].append(run_train(args, name, seq, deadline))
                    write(results, out)
                steps = [r.get("step_ms") for r in results["train"]]
                if all(steps):
                    results["train_step_ratio"] = steps[0] / steps[1]
            else:
                raise ValueError(f"unknown part {part!r}")
        except Exception as err:  # noqa: BLE001 - one part failing must not lose the others
            results.setdefault("errors", {})[part] = f"{type(err).__name__}: {err}"
        results.setdefault("seconds", {})[part] = round(time.monotonic() - t0, 1)
        write(results, out)
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
