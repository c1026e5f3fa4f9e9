"""Wiring chapter shards into DeepSpeed's expert-parameter machinery.

DeepSpeed reduces expert gradients over the expert-data-parallel group (divided by the DP size, so
EP never changes the update's scale) only when its engine finds a ``deepspeed.moe.layer.MoE`` module
in the model. The bank's routed shards are expert parameters but the bank is not a DeepSpeed MoE
layer, so the engine is told with a parameter-free marker. The marker declares no experts, so
DeepSpeed writes and reads no expert checkpoint files for it: bank shards are checkpointed by
global chapter id instead, which lets a checkpoint be read at another EP size.
"""

from __future__ import annotations

from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from moc_megatron.parallel.state import ParallelContext


class ChapterShardsMarker(MoE):
    def __init__(self, ep_size: int):
        nn.Module.__init__(self)  # deliberately not MoE.__init__: no gate, no experts
        self.ep_size = ep_size
        self.num_experts = self.num_local_experts = 0
        self.expert_group_name = f"ep_size_{ep_size}"

    def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
        """The groups are megatron-core's, registered by parallel.state.initialize."""

    def forward(self, x):
        return x


def mark_chapter_parallel(model: nn.Module, ctx: ParallelContext) -> None:
    """Attach the marker when chapters are sharded (EP > 1); a no-op otherwise."""
    if ctx.ep_size > 1 and not any(isinstance(m, ChapterShardsMarker) for m in model.modules()):
        model.add_module("chapter_shards_marker", ChapterShardsMarker(ctx.ep_size))


def split_expert_param_groups(param_groups: list[dict]) -> list[dict]:
    """Give expert parameters their own optimizer groups ('moe': True), as ZeRO requires."""
    return list(split_params_into_different_moe_groups_for_optimizer(param_groups))
