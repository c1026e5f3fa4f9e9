"""Row-sparse bank gradients (--memory-bank-optimizer sparse_adam) and the row-sparse Adam.

In sparse mode the bank's gradient is a coalesced sparse tensor over exactly the chapters that routing
units read. It must equal the dense gradient of the naive reference, in one process and with chapters
sharded over EP ranks, and forward+backward must allocate nothing of the bank's size. RowSparseAdam
updates only the touched rows and is AdamW when every row is touched.
"""

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from multiproc import run_ranks
from test_memory_layer import CASES, naive_memory_branch, weights_of
from test_memory_layer import tiny_cfg as branch_cfg
from test_parallel_model import batch, gather, perturb_zero_inits
from test_parallel_model import tiny_cfg as model_cfg

from moc_megatron.model.gpt import MemoryBank, MemoryBranch, MoCModel, seeded
from moc_megatron.model.memory import router_losses, router_stats
from moc_megatron.training.sparse_adam import RowSparseAdam, reduce_sparse_grad


def build_branch(ctx, cfg, sparse_grad=True):
    with seeded(0, "test"):
        branch = MemoryBranch(ctx, cfg)
        bank = MemoryBank(cfg, 0.5, sparse_grad=sparse_grad)
        torch.nn.init.normal_(branch.memory_attn.o_proj.weight, std=0.2)  # zero init would hide gradients
        torch.nn.init.normal_(branch.router.proj.weight, std=0.5)          # distinct routing per unit
    return branch, bank


def bank_params(bank):
    return [p for p in (bank.shared, bank.routed) if p is not None]


def rows_of(grad, first=0):
    assert grad.is_sparse and grad.is_coalesced()
    return set((grad.indices()[0] + first).tolist())


# ---------------------------------------------------------------------------------------------
# One memory branch, one process.


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_bank_gradient_equals_naive_reference_gradient(ctx, case):
    cfg = branch_cfg(**CASES[case])
    branch, bank = build_branch(ctx, cfg)
    gen = torch.Generator().manual_seed(0)
    h, h_in, g_out = (torch.randn(3, 8, 16, generator=gen) for _ in range(3))
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[1, 5:] = False

    out, routing = branch(h, h_in, bank, valid)
    losses = router_losses(routing, cfg)
    ((out * g_out).sum() + losses["load_balance_loss"] + losses["z_loss"]).backward()

    full = torch.cat([p.detach() for p in bank_params(bank)]).requires_grad_()
    ref_out, ref_lb, ref_z = naive_memory_branch(weights_of(branch), h, h_in, full, valid, cfg)
    (ref,) = torch.autograd.grad((ref_out * g_out).sum() + ref_lb + ref_z, [full])
    ours = torch.cat([p.grad.to_dense() for p in bank_params(bank)])
    assert all(p.grad.is_sparse and p.grad.is_coalesced() for p in bank_params(bank))
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("case", ["shared1_topk3", "shared0_topk1", "chunk_shared_only"])
def test_sparse_bank_gradient_holds_exactly_the_chapters_units_read(ctx, case):
    cfg = branch_cfg(**CASES[case])
    branch, bank = build_branch(ctx, cfg)
    h = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(1))
    out, routing = branch(h, h, bank, None)
    out.sum().backward()
    ns = cfg.memory.shared_chapters
    read = set(routing.chapters[..., :ns].flatten().tolist())
    read |= set(routing.chapters[routing.active][:, ns:].flatten().tolist())  # units that route read these
    touched = rows_of(bank.routed.grad, bank.first_routed) | (rows_of(bank.shared.grad) if ns else set())
    assert touched == read
    if case == "chunk_shared_only":  # chunk 0 of each sequence routes to nothing: its top-k is not read
        assert read != set(routing.chapters.flatten().tolist())


def test_sparse_gradients_accumulate_over_micro_batches(ctx):
    cfg = branch_cfg(shared_chapters=1, top_k=2)
    gen = torch.Generator().manual_seed(2)
    micro = [torch.randn(2, 8, 16, generator=gen) for _ in range(3)]
    grads = {}
    for sparse in (True, False):
        branch, bank = build_branch(ctx, cfg, sparse_grad=sparse)
        for h in micro:
            branch(h, h, bank, None)[0].sum().backward()
        grads[sparse] = [p.grad for p in bank_params(bank)]
    for s, d in zip(grads[True], grads[False]):
        assert s.is_sparse and s.is_coalesced()
        torch.testing.assert_close(s.to_dense(), d, rtol=1e-6, atol=1e-7)


def largest_allocation(fn) -> int:
    """Bytes of the largest single allocation torch's CPU allocator makes while fn runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def test_sparse_forward_backward_allocates_nothing_bank_sized_and_no_one_hot(ctx):
    """A bank of 4097 chapters (2.1 MB); 8 units x top-4. Sparse mode must not allocate a bank-sized
    buffer, nor a one-hot (units*k, chapters) routing table; the dense mode allocates its gradient.
    (The CPU attention kernel's fixed scratch, 256 KB, stays below both.)"""
    cfg = branch_cfg(shared_chapters=1, top_k=4, chapters=4097, tokens=4097 * 8, layers=[0])
    h = torch.randn(8, 8, 16, generator=torch.Generator().manual_seed(3))
    largest = {}
    for sparse in (True, False):
        branch, bank = build_branch(ctx, cfg, sparse_grad=sparse)

        def step():
            out, routing = branch(h, h, bank, None)
            losses = router_losses(routing, cfg)
            router_stats(routing, cfg)
            (out.sum() + losses["load_balance_loss"] + losses["z_loss"]).backward()

        step()  # warm up
        branch.zero_grad(set_to_none=True)
        bank.zero_grad(set_to_none=True)
        largest[sparse] = largest_allocation(step)
    bank_bytes = bank.routed.numel() * 4
    one_hot_bytes = 8 * 4 * 4097 * 4  # float (units*k, chapters)
    assert largest[False] >= bank_bytes, "the check must see the dense gradient"
    assert largest[True] < min(bank_bytes, one_hot_bytes), largest


# ---------------------------------------------------------------------------------------------
# The whole model: sparse mode in one process and with EP=2 against the dense single process.


def sparse_model_cfg(ep=1, **memory):
    cfg = model_cfg(ep=ep, **memory)
    cfg.training.memory_bank_optimizer = "sparse_adam"
    return cfg


def model_gradients(ctx, cfg, recompute=False):
    cfg.model.recompute_activations = recompute
    model = MoCModel(cfg.validate(), ctx)
    perturb_zero_inits(model, ctx)
    tokens = batch()
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_model_sparse_gradients_equal_dense_gradients(ctx, recompute):
    """Two memory layers read one bank: their sparse gradients add up to the dense one."""
    dense = model_gradients(ctx, model_cfg())
    sparse = model_gradients(ctx, sparse_model_cfg(), recompute)
    assert set(dense) == set(sparse)
    for name, ref in dense.items():
        got = sparse[name]
        if name.startswith("banks."):
            assert got.is_sparse and got.is_coalesced(), name
            got = got.to_dense()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7, msg=name)


def test_default_adamw_mode_keeps_dense_bank_gradients(ctx):
    grads = model_gradients(ctx, model_cfg())
    assert not grads["banks.0.routed"].is_sparse and not grads["banks.0.shared"].is_sparse


def _ep2_sparse(rank, world_size, memory):
    from moc_megatron.parallel.state import initialize

    cfg = sparse_model_cfg(ep=2, **memory).validate(world_size)
    ctx = initialize(cfg.parallel)
    model = MoCModel(cfg, ctx)
    perturb_zero_inits(model, ctx)
    tokens = batch().chunk(ctx.dp_size)[ctx.dp_rank]
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    bank = model.banks[0]
    local_rows = sorted(rows_of(bank.routed.grad, bank.first_routed))
    grads = {}
    for name, p in model.named_parameters():
        if name.endswith(".routed"):  # chapter shard: reduced over expert-data-parallel ranks only
            g = reduce_sparse_grad(p, ctx.expert_dp_group, divisor=ctx.dp_size)
            assert g.is_sparse and g.is_coalesced()
            grads[name] = gather(g.to_dense(), 0, ctx.ep_group, ctx.ep_size)
        elif name.endswith(".shared"):
            grads[name] = reduce_sparse_grad(p, ctx.dp_group, divisor=ctx.dp_size).to_dense()
        else:
            dist.all_reduce(p.grad, group=ctx.dp_group)
            grads[name] = p.grad / ctx.dp_size
    return {"grads": grads, "rows": local_rows}


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["sequence", "chunk_shared_only_first"])
def test_ep2_sparse_gradients_match_single_process(ctx, memory):
    """EP=2 (DP=2): each rank's sparse shard gradient holds the rows of its chapters that the single
    process's holds, no padding rows, and the reduced gradients equal the dense single process's."""
    from test_parallel_model import MEMORY

    ref = model_gradients(ctx, model_cfg(**MEMORY[memory]))
    ref_sparse = model_gradients(ctx, sparse_model_cfg(**MEMORY[memory]))
    ref_rows = rows_of(ref_sparse["banks.0.routed"], 1)
    results = run_ranks(_ep2_sparse, 2, args=(MEMORY[memory],), timeout=300)
    assert set(results[0]["rows"]) | set(results[1]["rows"]) == ref_rows
    assert all(r < 5 for r in results[0]["rows"]) and all(r >= 5 for r in results[1]["rows"])
    for name, want in ref.items():
        got = results[0]["grads"][name]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max().clamp(min=1e-8), name


# ---------------------------------------------------------------------------------------------
# RowSparseAdam and reduce_sparse_grad.


def sparse_rows(rows, values, shape):
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape).coalesce()


def test_row_sparse_adam_is_adamw_when_every_row_is_touched():
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(6, 3, 2, generator=gen)
    ours, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt = RowSparseAdam([ours], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(4):
        g = torch.randn(6, 3, 2, generator=gen)
        ours.grad, ref.grad = sparse_rows(list(range(6)), g, g.shape), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[ours]["exp_avg_sq"], ref_opt.state[ref]["exp_avg_sq"], rtol=0, atol=0)


def test_row_sparse_adam_leaves_untouched_rows_and_moments_alone():
    """Rows 1 and 4 are touched every step; they follow AdamW on just those rows, the rest keep
    their weights and zero moments whatever the weight decay."""
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(6, 4, generator=gen)
    ours = start.clone().requires_grad_()
    ref = start[[1, 4]].clone().requires_grad_()
    opt = RowSparseAdam([ours], lr=0.05, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(2, 4, generator=gen)
        ours.grad, ref.grad = sparse_rows([4, 1], g.flip(0), ours.shape), g.clone()
        opt.step()
        ref_opt.step()
    untouched = [0, 2, 3, 5]
    assert torch.equal(ours[untouched], start[untouched])
    assert opt.state[ours]["exp_avg"][untouched].abs().max() == 0
    torch.testing.assert_close(ours[[1, 4]], ref, rtol=0, atol=0)


def test_row_sparse_adam_accepts_dense_gradients():
    p = torch.ones(3, 2, requires_grad=True)
    p.grad = torch.ones(3, 2)
    RowSparseAdam([p], lr=0.1).step()
    assert torch.allclose(p, torch.full((3, 2), 0.9))


def _bf16_updates(steps, start, opt=None, p=None):
    """``steps`` steps of RowSparseAdam at lr 1e-4 on rows 1 and 4 of a bf16 parameter; the same bf16 gradients
    drive an fp32 copy (the reference)."""
    gen = torch.Generator().manual_seed(11)
    p = start.bfloat16().requires_grad_() if p is None else p
    ref = start.bfloat16().float().requires_grad_()
    opt = RowSparseAdam([p], lr=1e-4, weight_decay=0.1) if opt is None else opt
    ref_opt = RowSparseAdam([ref], lr=1e-4, weight_decay=0.1)
    for _ in range(steps):
        g = (0.5 + torch.rand(2, 4, generator=gen)).bfloat16()  # one sign: each step moves a weight by ~lr
        p.grad, ref.grad = sparse_rows([1, 4], g, p.shape), sparse_rows([1, 4], g.float(), ref.shape)
        opt.step()
        ref_opt.step()
    return p, opt, ref


def test_row_sparse_adam_in_bf16_moves_rows_as_fp32_does_below_bf16_resolution():
    """Rows near 1.0 take 200 updates of ~1e-4, each far below half a bf16 step there (2^-9): a bf16 weight
    updated in place never moves. fp32 master rows and moments move it as the fp32 run does (and the
    weight is that master, rounded)."""
    start = 1.0 + torch.rand(6, 4, generator=torch.Generator().manual_seed(3)) * 0.01
    p, opt, ref = _bf16_updates(200, start)
    moved = (p.detach().float() - start.bfloat16().float()).abs()
    assert moved[[1, 4]].min() >= 2**-8 and moved[[0, 2, 3, 5]].max() == 0
    assert torch.equal(p.detach(), ref.detach().bfloat16())
    state = opt.state[p]
    assert p.dtype == torch.bfloat16
    assert {state[k].dtype for k in ("master", "exp_avg", "exp_avg_sq")} == {torch.float32}
    assert torch.equal(state["master"], ref.detach())


def test_row_sparse_adam_state_keeps_fp32_through_a_checkpoint_and_resumes_bitwise(tmp_path):
    start = 1.0 + torch.rand(6, 4, generator=torch.Generator().manual_seed(4)) * 0.01
    straight, _, _ = _bf16_updates(60, start)
    first, opt, _ = _bf16_updates(30, start)
    torch.save({"param": first.detach(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    p = saved["param"].clone().requires_grad_()
    resumed_opt = RowSparseAdam([p], lr=1e-4, weight_decay=0.1)
    resumed_opt.load_state_dict(saved["optim"])
    assert resumed_opt.state[p]["master"].dtype == torch.float32  # torch's own load would cast it to bf16
    resumed = _continue(p, resumed_opt, skip=30, steps=30)  # the same gradient stream, from step 31
    assert torch.equal(resumed.detach(), straight.detach())


def _continue(p, opt, skip, steps):
    gen = torch.Generator().manual_seed(11)
    for i in range(skip + steps):
        g = (0.5 + torch.rand(2, 4, generator=gen)).bfloat16()
        if i >= skip:
            p.grad = sparse_rows([1, 4], g, p.shape)
            opt.step()
    return p


def _reduce_and_step(rank, world_size):
    # rank 0 touches rows {0, 2}, rank 1 rows {2, 5}; values are rank-dependent
    rows = [[0, 2], [2, 5]][rank]
    values = torch.arange(4.0).view(2, 2) + 10 * rank
    p = torch.zeros(6, 2, requires_grad=True)
    p.grad = sparse_rows(rows, values, p.shape)
    g = reduce_sparse_grad(p, None, divisor=2)
    q = torch.zeros(4, 3, requires_grad=True)  # only rank 0 read a row of this one
    q.grad = sparse_rows([3], torch.ones(1, 3), q.shape) if rank == 0 else None
    reduce_sparse_grad(q, None)
    opt = RowSparseAdam([p, q], lr=0.1)
    opt.step()
    return {"grad": g.to_dense(), "coalesced": g.is_coalesced(), "param": p.detach().clone(),
            "q_grad": q.grad.to_dense()}


@pytest.mark.slow
def test_reduce_sparse_grad_sums_over_ranks_and_sparse_adam_agrees():
    results = run_ranks(_reduce_and_step, 2, timeout=120)
    want = torch.zeros(6, 2)
    want[[0, 2]] += torch.arange(4.0).view(2, 2)
    want[[2, 5]] += torch.arange(4.0).view(2, 2) + 10
    want /= 2
    for r in results:
        assert r["coalesced"]
        torch.testing.assert_close(r["grad"], want)
    assert torch.equal(results[0]["param"], results[1]["param"])
    moved = (results[0]["param"] != 0).any(1)
    assert moved.tolist() == [True, False, True, False, False, True]
    assert all(torch.equal(r["q_grad"], torch.zeros(4, 3).index_fill_(0, torch.tensor([3]), 1.0)) for r in results)
