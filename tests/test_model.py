import pytest
import torch

from moc_megatron.accounting import count_parameters
from moc_megatron.config import load_config
from moc_megatron.model.gpt import MoCModel, parameter_groups


def tiny(repo_root, name="moc-tiny", **over):
    over.setdefault("training", {}).setdefault("seq_length", 32)
    return load_config(f"{repo_root}/configs/models/{name}.yaml", **over).validate()


def group_counts(model):
    return {k: sum(p.numel() for _, p in v) for k, v in parameter_groups(model).items()}


@pytest.mark.parametrize("name", ["moc-tiny", "vanilla-tiny", "moc-paper", "vanilla-iso-flop"])
def test_model_has_exactly_the_estimators_parameter_counts(ctx, repo_root, name):
    cfg = load_config(f"{repo_root}/configs/models/{name}.yaml").validate()
    with torch.device("meta"):  # the paper model's shapes without allocating 1.5 GB
        model = MoCModel(cfg, ctx)
    counts, expected = group_counts(model), count_parameters(cfg)
    assert counts["backbone"] == expected["backbone"]
    assert counts["memory_layers"] == expected["memory_layers"]
    assert counts["bank"] == expected["bank"]
    assert sum(counts.values()) == expected["total"]


def test_per_layer_banks(ctx, repo_root):
    cfg = tiny(repo_root, memory={"bank_sharing": "per_layer"})
    model = MoCModel(cfg, ctx)
    assert len(model.banks) == 2 and model.bank_for(1) is not model.bank_for(3)
    assert group_counts(model)["bank"] == count_parameters(cfg)["bank"] == 2 * 8256 * 128


def test_memory_branch_starts_as_identity(ctx, repo_root):
    """W_O is zero at init and the backbone is seeded as in vanilla, so MoC == vanilla at step 0."""
    tokens = torch.randint(0, 4096, (2, 32))
    moc = MoCModel(tiny(repo_root), ctx)
    vanilla = MoCModel(tiny(repo_root, "vanilla-tiny"), ctx)
    assert torch.equal(moc(tokens).logits, vanilla(tokens).logits)


def test_init_depends_only_on_seed(ctx, repo_root):
    a = weights(MoCModel(tiny(repo_root), ctx))
    b = weights(MoCModel(tiny(repo_root), ctx))
    c = weights(MoCModel(tiny(repo_root, training={"seed": 7, "seq_length": 32}), ctx))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["banks.0.routed"], c["banks.0.routed"])
    # weights of a layer do not depend on how many layers precede it in this process
    deeper = weights(MoCModel(tiny(repo_root, model={"num_layers": 6}), ctx))
    assert torch.equal(a["layers.3.mlp.up_proj.weight"], deeper["layers.3.mlp.up_proj.weight"])


def weights(model):
    return dict(model.named_parameters())


def test_recompute_activations_gives_identical_gradients(ctx, repo_root):
    tokens = torch.randint(0, 4096, (2, 33))
    grads = []
    for recompute in (False, True):
        model = MoCModel(tiny(repo_root, model={"recompute_activations": recompute}), ctx)
        torch.manual_seed(0)
        torch.nn.init.normal_(model.layers[1].memory.memory_attn.o_proj.weight, std=0.02)
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-9)


def test_loss_is_lm_plus_weighted_aux(ctx, repo_root):
    cfg = tiny(repo_root)
    model = MoCModel(cfg, ctx)
    tokens = torch.randint(0, 4096, (2, 33))
    out = model(tokens[:, :-1], tokens[:, 1:])
    expected = out.lm_loss + 0.01 * out.load_balance_loss + 0.001 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    ref = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).logits.reshape(-1, 4096), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref)
    stats = out.router_stats[0]
    assert 0 < stats["chapters_used"] <= 1 and stats["usage"].sum() == 2 * cfg.memory.top_k


def test_loss_mask_excludes_positions(ctx, repo_root):
    model = MoCModel(tiny(repo_root), ctx)
    tokens = torch.randint(0, 4096, (1, 33))
    mask = torch.zeros(1, 32)
    mask[0, :10] = 1
    full = tensor_losses(model, tokens)
    torch.testing.assert_close(model(tokens[:, :-1], tokens[:, 1:], mask).lm_loss, full[0, :10].mean())


def tensor_losses(model, tokens):
    logits = model(tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


@pytest.mark.parametrize("routing", ["sequence", "chunk"])
def test_overfitting_a_few_batches_drives_the_loss_down(ctx, repo_root, routing):
    torch.manual_seed(0)
    cfg = tiny(repo_root, model={"num_layers": 2, "vocab_size": 256},
               memory={"layers": [1], "routing_unit": routing, "routing_chunk": 8})
    model = MoCModel(cfg, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [torch.randint(0, 256, (4, 33)) for _ in range(2)]
    first = last = None
    for step in range(60):
        tokens = batches[step % 2]
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.lm_loss.item()
        last = out.lm_loss.item()
    assert first > 5.0 and last < 0.5 * first, (first, last)
    bank_delta = model.banks[0].routed.grad.abs().sum()
    assert bank_delta > 0, "the bank must be trained"
