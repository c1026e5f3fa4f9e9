"""GPU checks (`pytest -m cuda tests/test_cuda.py`; benchmarks/gpu/check.sh runs them on the lent GPU machine).

Every test is skipped without CUDA, so the module imports and skips on the CPU machines. On a GPU: the extension's
CUDA gather / scatter / weight-grad against the torch path on the same CUDA tensors, the Triton chapter attention
against the torch reference (float64) at the paper's shapes and a GQA case, one bf16 training step of moc-tiny
under NCCL, and the host-sync budget of a memory layer counted by torch.cuda.set_sync_debug_mode("warn").

MOC_GPU_REPORT=path.json collects the measured errors and counts (check.sh puts it in check.json).
Letters: b batch, n selected per row, t tokens per chapter, d width, u table rows; U units, c queries per unit,
h query heads, kv K/V heads, e head dim.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import moc_megatron.ops as ops
from moc_megatron.ops import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
needs_cuda_extension = pytest.mark.skipif(
    _backend.EXTENSION is None or not getattr(_backend.EXTENSION, "with_cuda", False),
    reason="moc_megatron._C has no CUDA kernels here (not built, or built without nvcc)")


def record(name: str, **values) -> None:
    """Add measurements under `name` to the MOC_GPU_REPORT JSON file, when it is set."""
    path = os.environ.get("MOC_GPU_REPORT")
    if not path:
        return
    data = json.load(open(path)) if os.path.exists(path) else {}
    data[name] = values
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: one number per tensor, robust to entries near zero."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def on(backend: str | None, monkeypatch, fn, *args):
    """fn(*args) with MOC_OPS_BACKEND=backend (None: the default, auto)."""
    if backend is None:
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_backend.ENV_VAR, backend)
    return fn(*args)


# ---------------------------------------------------------------------------------------------
# Chapter gather / scatter / weight gradient: the CUDA kernels against the torch path

OPS_SHAPES = {
    "paper": dict(u=260, t=64, d=768, b=4, n=65),   # one memory layer of moc-paper at micro-batch 4
    "odd": dict(u=7, t=3, d=5, b=3, n=4),           # widths that no vector load divides
}


def ops_case(dtype, u, t, d, b, n, seed=0):
    """Shared chapter 0 in every row (duplicates across rows), a duplicate within row 0, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(u, t, d, generator=g)
    index = torch.stack([torch.randperm(u - 1, generator=g)[: n - 1] + 1 for _ in range(b)]) if u > n else \
        torch.randint(1, u, (b, n - 1), generator=g)
    index = torch.cat([torch.zeros(b, 1, dtype=torch.int64), index], 1)
    index[0, -1] = index[0, 1]
    weight = torch.rand(b, n, generator=g) + 0.5
    grad = torch.randn(b, n, t, d, generator=g)
    return [x.to("cuda", dtype) if x.is_floating_point() else x.cuda() for x in (table, index, weight, grad)]


@needs_cuda_extension
def test_extension_serves_cuda_tensors():
    assert ops.backend() == "cuda"
    assert _backend.kernels_for(torch.device("cuda")) is _backend.EXTENSION


@needs_cuda_extension
@pytest.mark.parametrize("shape", list(OPS_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_gather_scatter_weight_grad_match_the_torch_path(shape, dtype, monkeypatch):
    table, index, weight, grad = ops_case(dtype, **OPS_SHAPES[shape])
    u = table.shape[0]
    got, ref = {}, {}
    for backend, out in (("cpp", got), ("torch", ref)):
        out["gather"] = on(backend, monkeypatch, ops.chapter_gather, table, index, weight)
        out["gather_unweighted"] = on(backend, monkeypatch, ops.chapter_gather, table, index, None)
        out["scatter"] = on(backend, monkeypatch, ops.chapter_scatter, grad, index, weight, u)
        out["scatter_unweighted"] = on(backend, monkeypatch, ops.chapter_scatter, grad, index, None, u)
        out["weight_grad"] = on(backend, monkeypatch, ops.chapter_weight_grad, grad, table, index)
    record(f"ops_{shape}_{str(dtype)[6:]}", **{k: {"bitwise": torch.equal(got[k], ref[k]),
                                                    "rel_err": rel_err(got[k], ref[k])} for k in got})
    for name in ("gather", "gather_unweighted", "scatter", "scatter_unweighted"):
        assert got[name].dtype == dtype and got[name].is_cuda
        if dtype == torch.float32:  # the kernels promise the torch path's summation order and rounding
            assert torch.equal(got[name], ref[name]), f"{name}: rel err {rel_err(got[name], ref[name]):.3g}"
        else:
            torch.testing.assert_close(got[name], ref[name], msg=lambda m: f"{name}: {m}")
    # the weight gradient's tree reduction is deterministic but sums in another order than the torch path's
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got["weight_grad"], ref["weight_grad"]) <= limit


@needs_cuda_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernels_are_bitwise_repeatable(dtype, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")
    table, index, weight, grad = ops_case(dtype, **OPS_SHAPES["paper"], seed=1)
    for _ in range(2):
        runs = [(ops.chapter_gather(table, index, weight), ops.chapter_scatter(grad, index, weight, table.shape[0]),
                 ops.chapter_weight_grad(grad, table, index)) for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b)


@needs_cuda_extension
def test_cuda_gather_backward_matches_the_torch_path(monkeypatch):
    table, index, weight, grad = ops_case(torch.float32, **OPS_SHAPES["paper"], seed=2)
    grads = {}
    for backend in ("cpp", "torch"):
        t, w = table.clone().requires_grad_(), weight.clone().requires_grad_()
        on(backend, monkeypatch, ops.chapter_gather, t, index, w).backward(grad)
        grads[backend] = (t.grad, w.grad)
    assert torch.equal(grads["cpp"][0], grads["torch"][0])
    assert rel_err(grads["cpp"][1], grads["torch"][1]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Chapter attention: the Triton kernel against the torch reference

ATTN_SHAPES = {
    "paper": dict(U=4, c=1024, h=12, kv=12, e=64, n=65, t=64, u=260),   # a moc-paper memory layer, micro-batch 4
    "gqa": dict(U=3, c=200, h=12, kv=4, e=64, n=9, t=64, u=19),         # 3 query heads per K/V head, ragged rows
}


def attn_case(dtype, U, c, h, kv, e, n, t, u, seed=0):
    """Chapter 0 shared by every unit, distinct routed rows per unit (shared across units), weights in
    [0.5, 1.5]; unit 1 leaves its last 3 slots unused (valid) and unit 0 one slot at -1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(U, c, h, e, generator=g)
    k, v = torch.randn(2, u, t, kv, e, generator=g)
    routed = torch.stack([torch.randperm(u - 1, generator=g)[: n - 1] + 1 for _ in range(U)])
    index = torch.cat([torch.zeros(U, 1, dtype=torch.int64), routed], 1)
    index[0, 2] = -1
    valid = torch.ones(U, n, dtype=torch.bool)
    valid[1, -3:] = False
    weight = torch.rand(U, n, generator=g) + 0.5
    floats = [x.to("cuda", dtype) for x in (q, k, v)]
    return floats + [index.cuda(), weight.cuda(), valid.cuda()]


def attn_grads(inputs, gout, glse):
    """out, lse and d(q, k, v, weight) of sum(out * gout) + sum(lse * glse) through ops.chapter_attention."""
    q, k, v, index, weight, valid = inputs
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, weight)]
    out, lse = ops.chapter_attention(leaves[0], leaves[1], leaves[2], index, leaves[3], valid=valid)
    loss = (out * gout).sum() + (lse * glse).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, leaves)


def triton_and_reference(shape, dtype, monkeypatch, seed=0):
    inputs = attn_case(dtype, **ATTN_SHAPES[shape], seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    U, c, h, e = inputs[0].shape
    gout = torch.randn(U, c, h, e, generator=g).to("cuda", dtype)  # the same values for both
    glse = torch.randn(U, c, h, generator=g).cuda()
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    got = attn_grads(inputs, gout, glse)
    monkeypatch.setenv(_backend.ENV_VAR, "torch")  # the definition, in float64 on the same values
    wide = [x.double() if x.is_floating_point() else x for x in inputs]
    ref = attn_grads(wide, gout.double(), glse.double())
    monkeypatch.delenv(_backend.ENV_VAR)
    names = ("out", "lse", "dq", "dk", "dv", "dweight")
    return dict(zip(names, (got[0], got[1], *got[2]))), dict(zip(names, (ref[0], ref[1], *ref[2])))


def test_chapter_attention_on_cuda_runs_the_triton_kernel(monkeypatch):
    from moc_megatron.ops import triton_attention

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert triton_attention.AVAILABLE and not triton_attention._interpreted()
    assert _backend.attention_kernels(torch.device("cuda")) is triton_attention


# fp32 runs exact (non-TF32) dots; bf16 rounds p and ds to bf16 before their matmuls, as flash attention does
LIMITS = {torch.float32: dict(out=2e-5, lse=2e-6, dq=2e-5, dk=2e-5, dv=2e-5, dweight=1e-4),
          torch.bfloat16: dict(out=2e-2, lse=1e-4, dq=3e-2, dk=3e-2, dv=3e-2, dweight=3e-2)}


@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_chapter_attention_matches_the_torch_reference(shape, dtype, monkeypatch):
    got, ref = triton_and_reference(shape, dtype, monkeypatch)
    errors = {name: rel_err(got[name], ref[name]) for name in got}
    record(f"attention_{shape}_{str(dtype)[6:]}", **errors)
    assert got["out"].dtype == dtype and got["lse"].dtype == torch.float32
    assert torch.isfinite(got["lse"]).all()
    bad = {name: f"{err:.3g} > {LIMITS[dtype][name]:g}" for name, err in errors.items() if err > LIMITS[dtype][name]}
    assert not bad, bad


def test_triton_chapter_attention_is_bitwise_repeatable(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    inputs = attn_case(torch.bfloat16, **ATTN_SHAPES["paper"], seed=3)
    g = torch.Generator().manual_seed(4)
    gout = torch.randn(inputs[0].shape, generator=g).to("cuda", torch.bfloat16)
    glse = torch.randn(inputs[0].shape[:3], generator=g).cuda()
    a, b = attn_grads(inputs, gout, glse), attn_grads(inputs, gout, glse)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# Host syncs of a memory layer on the GPU: at most 2 per layer at EP=1 (tests/test_host_syncs.py counts the
# same on CPU by aten op); here torch.cuda.set_sync_debug_mode("warn") names every wait the GPU really makes.

SYNC_MEMORY = {"sequence": {}, "chunk": {"routing_unit": "chunk", "routing_chunk": 32, "first_chunk": "shared_only"}}


def cuda_syncs_of_one_step(cfg, ctx) -> tuple[int, list]:
    from moc_megatron.model.gpt import MoCModel

    torch.manual_seed(0)
    model = MoCModel(cfg, ctx).cuda()
    for layer in model.layers:  # W_O starts at zero, which would hide every memory gradient
        if layer.memory is not None:
            torch.nn.init.normal_(layer.memory.memory_attn.o_proj.weight, std=0.02)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.training.seq_length + 1), device="cuda")

    def step():
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()

    step()  # warm-up: lazy initialisation, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).split("\n")[0] for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), syncs


@pytest.mark.parametrize("memory", list(SYNC_MEMORY))
def test_memory_layer_waits_on_the_host_at_most_twice_on_the_gpu(ctx, repo_root, memory):
    from moc_megatron.config import load_config

    def cfg(layers):
        c = load_config(f"{repo_root}/configs/models/moc-tiny.yaml", memory=SYNC_MEMORY[memory],
                        training=dict(seq_length=128))
        c.memory.layers = layers
        return c.validate()

    with_memory = cfg([1, 3])
    total, kinds = cuda_syncs_of_one_step(with_memory, ctx)
    baseline, base_kinds = cuda_syncs_of_one_step(cfg([]), ctx)
    per_layer = (total - baseline) / len(with_memory.memory.layers)
    record(f"host_syncs_{memory}", per_layer=per_layer, total=total, baseline=baseline,
           kinds=sorted(set(kinds)), baseline_kinds=sorted(set(base_kinds)))
    assert per_layer <= 2, (per_layer, kinds, base_kinds)


# ---------------------------------------------------------------------------------------------
# One bf16 training step of moc-tiny under NCCL (a fresh process: its own world of one); last, the slowest

TRAIN_CHILD = textwrap.dedent("""
    import json, warnings
    import torch
    from moc_megatron.config import load_config
    import moc_megatron.training.trainer as trainer

    cfg = load_config("configs/models/moc-tiny.yaml", training=dict(
        seq_length=256, micro_batch_size=4, global_batch_size=4, train_iters=3, lr=1e-3, min_lr=1e-4,
        lr_decay_style="constant", mock_data=True, bf16=True, log_interval=100, eval_interval=0, zero_stage=1))
    run = trainer.build(cfg)
    losses = [trainer.one_step(run).loss for _ in range(2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses.append(trainer.one_step(run).loss)
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).split(chr(10))[0] for w in caught if "synchroniz" in str(w.message)]
    run.reporter.close()
    import torch.distributed as dist
    params = list(run.engine.module.parameters())
    print("RESULT " + json.dumps({
        "losses": losses, "backend": dist.get_backend(), "world": dist.get_world_size(),
        "param_devices": sorted({str(p.device) for p in params}),
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "syncs_in_step_3": len(syncs), "sync_kinds": sorted(set(syncs))[:10]}))
    dist.destroy_process_group()
""")


@pytest.mark.timeout(110)
def test_one_bf16_training_step_of_moc_tiny_on_one_gpu_with_nccl():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", _backend.ENV_VAR)}
    proc = subprocess.run([sys.executable, "-c", TRAIN_CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=100)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(lines[-1][len("RESULT "):])
    record("train_step_moc_tiny_bf16", **res)
    assert res["backend"] == "nccl" and res["world"] == 1
    assert all(math.isfinite(x) for x in res["losses"]), res["losses"]
    assert res["param_devices"] == ["cuda:0"]
    assert res["param_dtypes"] == ["torch.bfloat16"]
