"""Host-sync budget of a training forward+backward: at most 2 per memory layer at EP=1 (the unique
count) and 4 at EP>1 (adding the pairs and the split sizes).

Counted on CPU tensors with the torch paths forced (MOC_OPS_BACKEND=torch), so each op is seen as
aten calls, as on a GPU; the model without memory layers gives the baseline of the rest of the step
(megatron-core's vocab-parallel cross-entropy indexes with a boolean mask).
"""

import pytest

from multiproc import run_ranks

from host_syncs import count_host_syncs
from test_parallel_model import batch, perturb_zero_inits, tiny_cfg

BUDGET = {1: 2, 2: 4}
MEMORY = {"sequence": {}, "chunk": {"routing_unit": "chunk", "routing_chunk": 8, "first_chunk": "shared_only"}}


def syncs_of_one_step(ctx, cfg):
    from moc_megatron.model.gpt import MoCModel

    model = MoCModel(cfg, ctx)
    perturb_zero_inits(model, ctx)
    tokens = batch().chunk(ctx.dp_size)[ctx.dp_rank]
    with count_host_syncs() as counter:
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
    return counter.total, dict(counter.counts)


def per_layer_syncs(ctx, memory, ep=1, world=1):
    cfg = tiny_cfg(ep=ep, **memory).validate(world)
    base = tiny_cfg(**memory)  # no memory layers, no chapter parallelism: the rest of the step
    base.memory.layers = []
    total, counts = syncs_of_one_step(ctx, cfg)
    baseline, _ = syncs_of_one_step(ctx, base.validate(world))
    return (total - baseline) / len(cfg.memory.layers), counts


def _rank(rank, world_size, memory):
    from moc_megatron.parallel.state import initialize

    cfg = tiny_cfg(ep=world_size, **memory).validate(world_size)
    return per_layer_syncs(initialize(cfg.parallel), memory, ep=world_size, world=world_size)


@pytest.mark.parametrize("memory", list(MEMORY))
def test_ep1_memory_layer_waits_on_the_host_at_most_twice(ctx, memory, monkeypatch):
    monkeypatch.setenv("MOC_OPS_BACKEND", "torch")
    per_layer, counts = per_layer_syncs(ctx, MEMORY[memory])
    assert per_layer <= BUDGET[1], counts


@pytest.mark.slow
@pytest.mark.parametrize("memory", list(MEMORY))
def test_ep2_memory_layer_waits_on_the_host_at_most_four_times(memory):
    for rank, (per_layer, counts) in enumerate(run_ranks(_rank, 2, args=(MEMORY[memory],), timeout=300,
                                                         env={"MOC_OPS_BACKEND": "torch"})):
        assert per_layer <= BUDGET[2], (rank, counts)
