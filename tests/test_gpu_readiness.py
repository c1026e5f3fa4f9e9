"""What the trainer does differently on GPUs, checked on the CPU; and, where a GPU is present, on it.

NCCL reduces no CPU tensor, and a CUDA tensor meets a CPU one in no operation (bar 0-dim CPU scalars).
On a CPU-only machine neither mistake shows, so ``FakeGPU`` plays the accelerator: inside it, tensors
made on ``GPU`` (or moved there, or computed from such tensors) are ``OnGPU``, and an operation mixing
them with CPU tensors raises as CUDA would. Collectives are replaced by a recorder of what they were given.
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from multiproc import run_ranks
from test_train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.device("meta")  # stands for the accelerator; the data stays on the CPU


class OnGPU(torch.Tensor):
    """A CPU tensor playing one on the accelerator (see FakeGPU)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


TO_HOST = {torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy}


class FakeGPU(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        prop = getattr(func, "__self__", None)  # a property's getter
        if prop is torch.Tensor.device:
            return GPU if isinstance(args[0], OnGPU) else torch.device("cpu")
        if prop is torch.Tensor.is_cuda:
            return isinstance(args[0], OnGPU)
        to_gpu, to_host = False, func in TO_HOST
        if "device" in kwargs and kwargs["device"] is not None:
            to_gpu, to_host = torch.device(kwargs["device"]) == GPU, torch.device(kwargs["device"]).type == "cpu"
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            for i, a in enumerate(args[1:], start=1):
                if isinstance(a, (str, torch.device)):
                    to_gpu, to_host = torch.device(a) == GPU, torch.device(a).type == "cpu"
                    args = (*args[:i], "cpu", *args[i + 1:])
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_gpu = any(isinstance(t, OnGPU) for t in tensors)
        if on_gpu and not to_host and any(not isinstance(t, OnGPU) and t.dim() > 0 for t in tensors):
            raise RuntimeError(f"{func.__name__}: expected all tensors to be on the same device, but found GPU and CPU "
                               "tensors")
        out = func(*args, **kwargs)
        if to_host:
            return pytree.tree_map(lambda r: r.as_subclass(torch.Tensor) if isinstance(r, OnGPU) else r, out)
        if on_gpu or to_gpu:
            return pytree.tree_map(lambda r: r.as_subclass(OnGPU) if isinstance(r, torch.Tensor) else r, out)
        return out


def test_fake_gpu_refuses_what_cuda_refuses():
    with FakeGPU():
        a = torch.ones(3, device=GPU)
        assert isinstance(a * 2, OnGPU) and a.device == GPU and a.is_cuda
        assert isinstance(a * torch.tensor(2.0), OnGPU)  # a CPU scalar is fine
        with pytest.raises(RuntimeError, match="same device"):
            a * torch.arange(3)
        assert type(a.cpu()) is torch.Tensor and (a.cpu() * torch.arange(3)).tolist() == [0.0, 1.0, 2.0]


class Collectives:
    """Stands in for torch.distributed's reductions: records whether each tensor was on the GPU."""

    def __init__(self, monkeypatch, module):
        self.on_gpu = []
        monkeypatch.setattr(module.dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, group=None, **kwargs):
        self.on_gpu.append(isinstance(tensor, OnGPU))


# ---------------------------------------------------------------------------------------------
# Metrics and collectives on the engine's device


class RecordingWriter:
    def __init__(self):
        self.histograms = []

    def add_histogram_raw(self, tag, **kwargs):
        self.histograms.append((tag, kwargs))


def test_chapter_usage_histogram_takes_counts_from_the_gpu():
    from moc_megatron.training.metrics import _usage_histogram

    tb = RecordingWriter()
    with FakeGPU():
        _usage_histogram(tb, "router/layer1/chapter_usage", torch.tensor([3, 0, 5], device=GPU), 7)
    (tag, h), = tb.histograms
    assert h["bucket_counts"] == [3.0, 0.0, 5.0] and h["num"] == 8.0 and h["sum"] == 10.0 and h["global_step"] == 7


def test_router_summary_reduces_on_the_gpu_and_returns_cpu_usage(monkeypatch):
    import moc_megatron.training.metrics as metrics

    monkeypatch.setattr(metrics.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(metrics.dist, "get_world_size", lambda group=None: 2)
    reduced = Collectives(monkeypatch, metrics)
    cfg = SimpleNamespace(memory=SimpleNamespace(shared_chapters=1, layers=[1]))
    with FakeGPU():
        router = [{"entropy": torch.tensor(1.5, device=GPU), "usage": torch.tensor([4, 0, 2, 2], device=GPU)}]
        (summary,) = metrics.router_summary(router, 2, cfg, dp_group=None)
    assert reduced.on_gpu == [True, True]
    assert type(summary["usage"]) is torch.Tensor and summary["usage"].tolist() == [4, 0, 2, 2]
    assert summary["chapters_used"] == pytest.approx(2 / 3) and summary["entropy"] == pytest.approx(0.375)


@pytest.mark.parametrize("stage_has_memory", [True, False])
def test_pipeline_aux_losses_are_reduced_on_the_engine_device(monkeypatch, stage_has_memory):
    import moc_megatron.training.pipeline_step as pipeline_step

    reduced = Collectives(monkeypatch, pipeline_step)
    ctx = SimpleNamespace(pp_group=None, pp_size=2, dp_group=None, dp_size=2)
    with FakeGPU():
        values = [{"load_balance_loss": torch.tensor(v, device=GPU), "z_loss": torch.tensor(v / 10, device=GPU)}
                  for v in (1.0, 3.0)] if stage_has_memory else []
        engine = SimpleNamespace(device=GPU, module=SimpleNamespace(pop_aux_values=lambda: values))
        lb, z = pipeline_step.aux_means(engine, ctx)
    assert reduced.on_gpu == [True, True]  # pipeline group, then data-parallel group
    assert (lb, z) == ((2.0, pytest.approx(0.2)) if stage_has_memory else (0.0, 0.0))


def test_step_losses_are_reduced_on_the_engine_device(monkeypatch):
    import moc_megatron.training.step as step

    reduced = Collectives(monkeypatch, step)
    with FakeGPU():
        out = SimpleNamespace(loss=torch.tensor(2.0, device=GPU), lm_loss=torch.tensor(1.5, device=GPU),
                              load_balance_loss=None, z_loss=None)
        parts = step.reduce_parts(step.loss_parts(out) + step.loss_parts(out), 2, SimpleNamespace(dp_size=2,
                                                                                                dp_group=None))
    assert reduced.on_gpu == [True] and parts.tolist() == [1.0, 0.75, 0.0, 0.0]  # the mock sums nothing


def test_every_torch_load_in_training_names_a_map_location():
    """A checkpoint written on GPUs must load on a machine with fewer (or none); state moves on explicitly."""
    missing = []
    for path in sorted(glob.glob(os.path.join(ROOT, "moc_megatron", "training", "*.py"))):
        for node in ast.walk(ast.parse(open(path).read())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "map_location" for k in node.keywords)):
                missing.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# Devices, precision settings and process groups


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on a machine with one GPU; records set_device."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_more_local_ranks_than_gpus_is_a_user_error_naming_both(fake_cuda, monkeypatch):
    from moc_megatron.errors import UserError
    from moc_megatron.parallel.state import bind_local_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"LOCAL_RANK=1, but this node has 1 visible CUDA device.*--nproc-per-node 1"):
        bind_local_device()
    monkeypatch.setenv("LOCAL_RANK", "0")
    bind_local_device()
    assert fake_cuda == [0]


def test_tf32_is_enabled_only_when_cuda_is_used(monkeypatch):
    from moc_megatron.training.trainer import cuda_settings

    before = torch.get_float32_matmul_precision()
    try:
        cuda_settings(tiny())
        assert torch.get_float32_matmul_precision() == before == "highest"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
        cuda_settings(tiny())
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("tp", [1, 2])
def test_cuda_device_max_connections_is_one_under_tensor_parallelism(monkeypatch, tp):
    from moc_megatron.training.trainer import cuda_settings

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    cfg = tiny()
    cfg.parallel.tensor_model_parallel_size = tp
    cuda_settings(cfg)
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == ("1" if tp > 1 else None)


@pytest.mark.parametrize("flags, expected", [
    ("", "unset"), ("--tensor-model-parallel-size 2", "1"), ("--tensor-model-parallel-size=4 --bf16", "1"),
    ("--tensor-model-parallel-size 1 --pipeline-model-parallel-size 2", "unset")])
def test_launch_scripts_export_cuda_device_max_connections_for_tp_only(flags, expected):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    script = 'set -euo pipefail; source launch_scripts/_common.sh "$@"; echo "${CUDA_DEVICE_MAX_CONNECTIONS:-unset}"'
    out = subprocess.run(["bash", "-c", script, "_", *flags.split()], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == expected


def test_adamw_is_fused_only_when_every_parameter_is_on_the_gpu():
    from moc_megatron.training.optim import build_optimizer, fused_adamw_fits

    gpu, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert fused_adamw_fits([{"params": [gpu]}, {"params": [gpu, gpu]}])
    assert not fused_adamw_fits([{"params": [gpu]}, {"params": [cpu]}]) and not fused_adamw_fits([])
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], tiny())
    assert not opt.defaults.get("fused")


def _gloo_groups_requested(rank, world_size):
    import moc_megatron.parallel.state as state
    from moc_megatron.config import ParallelConfig

    state.initialize(ParallelConfig())  # DeepSpeed's comm joins the (gloo) world first
    asked = []
    real = state.ps.initialize_model_parallel

    def recording(*args, **kwargs):
        asked.append(kwargs.get("create_gloo_process_groups", True))
        return real(*args, **kwargs)

    state.ps.initialize_model_parallel = recording
    for backend in ("gloo", "nccl"):
        state.dist.get_backend = lambda group=None, backend=backend: backend
        state.initialize(ParallelConfig())
    return asked


def test_megatron_creates_no_gloo_groups_under_nccl():
    assert run_ranks(_gloo_groups_requested, 1, timeout=120)[0] == [True, False]


# ---------------------------------------------------------------------------------------------
# On a GPU, when there is one


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_gpu
@pytest.mark.slow
def test_gpu_bf16_run_logs_tensorboard_histograms_and_names_the_ops_backend(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train_cli import FAST, moc_train

    result = moc_train([*FAST, "--train-iters", "3", "--log-interval", "1", "--eval-interval", "3",
                        "--eval-iters", "1", "--bf16", "--tensorboard-dir", str(tmp_path / "tb")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16 on cuda" in result.stdout and "chapter ops: " in result.stdout
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert "router/layer1/chapter_usage" in acc.Tags()["histograms"] and "eval/lm_loss" in acc.Tags()["scalars"]


def _gpu_run(rank, world_size, cfg):
    from moc_megatron.training.trainer import train

    run = train(cfg)
    base = getattr(run.engine.optimizer, "optimizer", run.engine.optimizer)
    return (torch.get_float32_matmul_precision(), base.defaults.get("fused"), str(run.engine.device),
            [type(v).__name__ for r in run.history for v in vars(r).values()])


@needs_gpu
@pytest.mark.slow
def test_gpu_run_uses_tf32_fused_adamw_and_keeps_no_tensors_in_history():
    precision, fused, device, types = run_ranks(_gpu_run, 1, (tiny(train_iters=2),), timeout=300)[0]
    assert precision == "high" and fused is True and device.startswith("cuda")
    assert "Tensor" not in types
