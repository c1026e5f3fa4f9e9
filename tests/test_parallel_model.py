"""Tensor, chapter (expert) and data parallel layouts reproduce the single-process model exactly.

Each layout runs on real gloo ranks: the global batch is split over data-parallel ranks, the model
over TP/EP ranks. Gradients are reduced as the DeepSpeed engine reduces them (dense: average over
DP; chapter shards: sum over the expert-data-parallel group divided by the DP size, so EP never
changes the update's scale), gathered into full tensors and compared, with the loss, against one
process running the whole batch.
"""

import pytest
import torch
import torch.distributed as dist

from multiproc import run_ranks

from moc_megatron.config import load_config
from moc_megatron.model.gpt import MoCModel

SEQ, BATCH = 16, 4


def tiny_cfg(tp=1, ep=1, **memory):
    mem = dict(layers=[0, 1], tokens=9 * 4, chapters=9, shared_chapters=1, top_k=3, num_heads=4, num_kv_heads=2)
    mem.update(memory)
    return load_config(model=dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                  ffn_hidden_size=64, vocab_size=128),
                       memory=mem, training=dict(seq_length=SEQ, seed=3),
                       parallel=dict(tensor_model_parallel_size=tp, expert_model_parallel_size=ep))


def batch():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 128, (BATCH, SEQ + 1), generator=g)


def perturb_zero_inits(model, ctx, force_chapters=()):
    """W_O of the memory branch starts at zero, which would hide every memory gradient. Give it the
    same full values in every layout: draw the full tensor from a seed, keep this rank's columns."""
    for i, layer in enumerate(model.layers):
        if layer is not None and layer.memory is not None:
            w = layer.memory.memory_attn.o_proj.weight                          # (d, h*e / tp)
            full = torch.randn(w.shape[0], w.shape[1] * ctx.tp_size, generator=torch.Generator().manual_seed(i))
            w.data.copy_(full.chunk(ctx.tp_size, dim=1)[ctx.tp_rank] * 0.3)
            layer.memory.router.proj.bias.data[list(force_chapters)] += 50.0  # every unit picks these


def run_layout(rank, world_size, tp, ep, memory, force_chapters=()):
    from moc_megatron.parallel.state import initialize

    cfg = tiny_cfg(tp, ep, **memory).validate(world_size)
    ctx = initialize(cfg.parallel)
    model = MoCModel(cfg, ctx)
    perturb_zero_inits(model, ctx, force_chapters)
    tokens = batch().chunk(ctx.dp_size)[ctx.dp_rank]
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=ctx.dp_group)
    sent = sum(layer.memory.memory_attn.chapter_parallel.bytes_sent for layer in model.layers
               if layer.memory is not None and layer.memory.memory_attn.chapter_parallel is not None)
    return {"loss": loss.item() / ctx.dp_size, "grads": full_gradients(model, ctx), "bytes_sent": sent}


def full_gradients(model, ctx):
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if name.endswith(".routed"):                     # chapter shard: an expert parameter
            if ctx.expert_dp_group is not None and dist.get_world_size(ctx.expert_dp_group) > 1:
                dist.all_reduce(g, group=ctx.expert_dp_group)
            g /= ctx.dp_size
            g = gather(g, 0, ctx.ep_group, ctx.ep_size)
        else:
            dist.all_reduce(g, group=ctx.dp_group)
            g /= ctx.dp_size
        if getattr(p, "tensor_model_parallel", False):
            g = gather(g, p.partition_dim, ctx.tp_group, ctx.tp_size)
        grads[name] = g
    return grads


def gather(t, dim, group, size):
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def single_process(ctx, memory, force_chapters=()):
    model = MoCModel(tiny_cfg(**memory).validate(), ctx)
    perturb_zero_inits(model, ctx, force_chapters)
    tokens = batch()
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    return out.loss.item(), {n: p.grad for n, p in model.named_parameters()}


LAYOUTS = {  # name: (world size, tp, ep)
    "dp2": (2, 1, 1),
    "tp2": (2, 2, 1),
    "ep2": (2, 1, 2),
    "tp2_ep2": (4, 2, 2),
    "ep4": (4, 1, 4),
}
MEMORY = {
    "sequence": {},
    "chunk_no_shared": {"routing_unit": "chunk", "routing_chunk": 8, "shared_chapters": 0, "chapters": 8,
                        "tokens": 32},
    "chunk_shared_only_first": {"routing_unit": "chunk", "routing_chunk": 8, "first_chunk": "shared_only"},
}


# Chunk routing changes the chapter-parallel dispatch (more units, ragged pairs): every EP layout runs
# one chunk variant; the layouts without EP run sequence routing only, to keep the suite short.
CHUNKED = {"ep2": ("chunk_no_shared", "chunk_shared_only_first"), "tp2_ep2": ("chunk_shared_only_first",),
           "ep4": ("chunk_no_shared",)}


@pytest.mark.slow
@pytest.mark.parametrize("memory", list(MEMORY))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process_loss_and_gradients(ctx, layout, memory):
    world, tp, ep = LAYOUTS[layout]
    if memory != "sequence" and memory not in CHUNKED.get(layout, ()):
        pytest.skip("this chunk variant is checked on another chapter-parallel layout")
    ref_loss, ref_grads = single_process(ctx, MEMORY[memory])
    results = run_ranks(run_layout, world, args=(tp, ep, MEMORY[memory]), timeout=300)
    for rank, result in enumerate(results):  # every rank holds the merged loss and full gradients
        assert abs(result["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (rank, result["loss"], ref_loss)
        assert_same_gradients(result["grads"], ref_grads, f"{layout}/{memory} rank {rank}")


def assert_same_gradients(grads, ref_grads, what):
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        got = grads[name]
        scale = ref.abs().max().clamp(min=1e-8)
        assert (got - ref).abs().max() <= 1e-4 * scale, f"{what}: gradient of {name} differs"


@pytest.mark.slow
def test_ep2_units_routed_all_to_one_rank_or_none_of_its_chapters(ctx):
    """Chapters 1-4 belong to EP rank 0, 5-8 to rank 1. Every unit picks 1, 2, 3: rank 1 receives
    no queries (empty splits) and rank 1's units send everything away."""
    force = (1, 2, 3)
    ref_loss, ref_grads = single_process(ctx, {}, force)
    results = run_ranks(run_layout, 2, args=(1, 2, {}, force), timeout=300)
    for rank, result in enumerate(results):
        assert abs(result["loss"] - ref_loss) <= 1e-5 * abs(ref_loss)
        assert_same_gradients(result["grads"], ref_grads, f"ep2 forced to rank 0, rank {rank}")
    assert results[0]["bytes_sent"] > 0 and results[1]["bytes_sent"] > 0
    assert ref_grads["banks.0.routed"][4:].abs().max() == 0  # rank 1's chapters untouched
