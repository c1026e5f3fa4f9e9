"""The one object that owns every process group.

megatron-core's parallel_state is global; it is wrapped here once, and modules receive a
ParallelContext at construction. No rank arithmetic happens anywhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.model_parallel_config import ModelParallelConfig

from moc_megatron.config import ParallelConfig
from moc_megatron.errors import UserError
from moc_megatron.parallel.net import free_port


@dataclass(frozen=True)
class ParallelContext:
    """Process groups and sizes of one rank. ``None`` groups mean size 1."""

    tp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    ep_group: Optional[dist.ProcessGroup]
    expert_dp_group: Optional[dist.ProcessGroup]
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def megatron_config(self, params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
        """Config for megatron-core's TP layers: full tensors initialised on CPU, then sharded,
        so weights do not depend on the layout."""
        return ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                   perform_initialization=True, params_dtype=params_dtype)


def init_distributed(backend: Optional[str] = None) -> None:
    """Initialise torch.distributed from the launcher's environment (torchrun/deepspeed), or as a
    world of one when launched as a plain process."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if "RANK" in os.environ:  # started by torchrun / the deepspeed launcher
        dist.init_process_group(backend)
        return
    # A plain process: a world of one on a fresh local port. Nothing goes into os.environ, so the
    # processes it starts (tools, launchers) do not inherit a rank or a port that is taken.
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's pipeline module reads it
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def bind_local_device() -> None:
    """Under CUDA, make cuda:LOCAL_RANK this process's device (before NCCL starts). More processes on
    a node than visible GPUs is refused: NCCL cannot put two ranks on one GPU."""
    if not torch.cuda.is_available():
        return
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if not 0 <= local_rank < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise UserError(f"LOCAL_RANK={local_rank}, but this node has {count} visible CUDA device(s){shown}: start at "
                        f"most {count} process(es) per node (torchrun --nproc-per-node {count}, deepspeed --num_gpus "
                        f"{count}), or make more GPUs visible")
    torch.cuda.set_device(local_rank)


def cpu_deepspeed() -> None:
    """Without a GPU: name DeepSpeed's CPU accelerator and skip its shared-memory comm op, whose
    JIT build takes minutes and which gloo does not need. Call before deepspeed.comm is used."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize(parallel: ParallelConfig) -> ParallelContext:
    """Build megatron-core's groups for this layout, and DeepSpeed's view of the same world."""
    init_distributed()
    cpu_deepspeed()
    import deepspeed.comm as dscomm

    if not dscomm.is_initialized():  # wraps the existing torch.distributed world
        dscomm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        # megatron's gloo twin of every group serves its distributed optimizer, which we do not use
        create_gloo_process_groups=dist.get_backend() != "nccl",
    )
    ctx = _context_from_megatron()
    if ctx.ep_size > 1:
        register_expert_groups(ctx)
    return ctx


def register_expert_groups(ctx: ParallelContext) -> None:
    """Give DeepSpeed megatron-core's expert groups under DeepSpeed's name for them, so the
    engine reduces chapter-shard gradients over exactly the ranks that hold the same shard."""
    from deepspeed.utils import groups

    name = f"ep_size_{ctx.ep_size}"
    for table, ranks_table, group in (
            (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, ctx.ep_group),
            (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, ctx.expert_dp_group)):
        table[name] = group
        ranks_table[name] = dist.get_process_group_ranks(group)


def _context_from_megatron() -> ParallelContext:
    return ParallelContext(
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
    )


def single_process() -> ParallelContext:
    """A context of size one everywhere (tests, tools, the HF verifier)."""
    return initialize(ParallelConfig())
