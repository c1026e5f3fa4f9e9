"""Hugging Face export (SPEC 2.4): the exported model computes the training model's logits.

The reference is always the training model (moc_megatron.model.gpt.MoCModel), never the HF code itself:
logits of a full forward, greedy decoding by repeated full forwards, and its loss and gradients. Memory
W_O is randomised (it is zero at init) so that a wrong memory read shows in the logits.
"""

import json
import os
import random

import pytest
import torch

from moc_megatron.config import load_config
from moc_megatron.hf.convert import from_hf, save_hf, to_hf
from moc_megatron.model.gpt import MoCModel

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

SEQ, VOCAB, TOL = 32, 4096, 1e-4


def tiny_config(repo_root, name="moc-tiny", **over):
    over.setdefault("training", {}).setdefault("seq_length", SEQ)
    over.setdefault("model", {}).setdefault("num_layers", 3)
    if name == "moc-tiny":
        over.setdefault("memory", {}).setdefault("layers", [0, 2])
    return load_config(f"{repo_root}/configs/models/{name}.yaml", **over).validate()


def training_model(ctx, cfg, o_proj_std=0.05):
    """The training model in eval mode with a memory branch that matters (W_O is zero at init)."""
    model = MoCModel(cfg, ctx).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i in cfg.memory.layers:
            w = model.layers[i].memory.memory_attn.o_proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * o_proj_std)
    return model


def export(model, cfg, out, **kw):
    save_hf(model.state_dict(), cfg.to_dict(), out, **kw)
    return AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()


def tokens(b=2, s=SEQ, seed=0):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def memory_effect(model, cfg, x):
    """How much the memory branch moves the training model's logits."""
    with torch.no_grad():
        full = model(x).logits
        saved = [model.layers[i].memory.memory_attn.o_proj.weight.clone() for i in cfg.memory.layers]
        for i in cfg.memory.layers:
            model.layers[i].memory.memory_attn.o_proj.weight.zero_()
        without = model(x).logits
        for i, w in zip(cfg.memory.layers, saved):
            model.layers[i].memory.memory_attn.o_proj.weight.copy_(w)
    return (full - without).abs().max().item()


CASES = {
    "sequence": {},
    "chunk": {"routing_unit": "chunk", "routing_chunk": 8},
    "chunk_shared_only_rolling": {"routing_unit": "chunk", "routing_chunk": 8, "first_chunk": "shared_only",
                                  "pooling": "rolling", "rolling_window": 5},
    "rolling_pooling": {"pooling": "rolling", "rolling_window": 5},
    "per_layer_banks": {"bank_sharing": "per_layer"},
    "shared_0": {"shared_chapters": 0},
    "shared_2_gqa_memory": {"shared_chapters": 2, "num_kv_heads": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_exported_logits_equal_training_model(ctx, repo_root, tmp_path, case):
    cfg = tiny_config(repo_root, memory=dict(CASES[case]))
    model = training_model(ctx, cfg)
    hf = export(model, cfg, tmp_path / "out")
    x = tokens()
    with torch.no_grad():
        diff = (hf(x).logits - model(x).logits).abs().max().item()
    effect = memory_effect(model, cfg, x)
    print(f"{case}: max |logit diff| = {diff:.3g} (memory branch moves logits by {effect:.3g})")
    assert effect > 1e-2
    assert diff <= TOL


@pytest.mark.parametrize("case", ["chunk", "chunk_shared_only_rolling"])
def test_chunk_routing_incremental_decoding_equals_full_forward(ctx, repo_root, tmp_path, case):
    cfg = tiny_config(repo_root, memory=dict(CASES[case], routing_chunk=4, rolling_window=3))
    hf = export(training_model(ctx, cfg), cfg, tmp_path / "out")
    x = tokens(s=24)
    with torch.no_grad():
        full = hf(x, use_cache=False).logits
        for sizes in ([1] * 24, [3, 6, 1, 5, 9]):  # token by token, and calls that start and end mid-chunk
            cache, parts, start = None, [], 0
            for n in sizes:
                out = hf(x[:, start:start + n], past_key_values=cache, use_cache=True)
                cache, start = out.past_key_values, start + n
                parts.append(out.logits)
            diff = (torch.cat(parts, 1) - full).abs().max().item()
            print(f"{case} calls {sizes}: max |logit diff| vs full forward = {diff:.3g}")
            assert diff <= TOL


def test_chunk_routing_generate_equals_training_greedy_decoding(ctx, repo_root, tmp_path):
    cfg = tiny_config(repo_root, model={"init_method_std": 0.1}, memory={"routing_unit": "chunk", "routing_chunk": 4})
    model = training_model(ctx, cfg)
    hf = export(model, cfg, tmp_path / "out")
    prompt = tokens(b=1, s=6)
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=14, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    with torch.no_grad():  # the training model's full forwards; the last chunk is usually shorter
        ref, ref_logits = greedy(model, prompt, 14)
    diff = max((a - b).abs().max().item() for a, b in zip(out.scores, ref_logits))
    print(f"chunk generate: tokens {out.sequences.tolist()}, max |step logit diff| = {diff:.3g}")
    assert len(set(ref[0, 6:].tolist())) > 3  # a decoding that is not stuck on one token
    assert torch.equal(out.sequences, ref)
    assert diff <= TOL


LEFT_PADDED = {"chunk": {"routing_unit": "chunk", "routing_chunk": 4}, "sequence": {},
               "rolling_pooling": {"pooling": "rolling", "rolling_window": 3}}


@pytest.mark.parametrize("case", LEFT_PADDED)
def test_left_padded_batch_generates_as_each_prompt_alone(ctx, repo_root, tmp_path, case):
    """generate() and a plain forward with only the attention mask: positions count valid tokens, so the
    padded row's rotary phases, chunk boundaries and pooling are those of the prompt alone."""
    cfg = tiny_config(repo_root, model={"init_method_std": 0.1}, memory=LEFT_PADDED[case])
    hf = export(training_model(ctx, cfg, o_proj_std=0.2), cfg, tmp_path / "out")
    short, long = tokens(b=1, s=6, seed=1), tokens(b=1, s=9, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    with torch.no_grad():
        both = hf.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False)
        alone = [hf.generate(p, max_new_tokens=10, do_sample=False) for p in (short, long)]
        diff = (hf(batch, attention_mask=mask).logits[0, 3:] - hf(short).logits[0]).abs().max().item()
    assert torch.equal(both[0, 3:], alone[0][0]) and torch.equal(both[1], alone[1][0])
    assert diff <= TOL


def test_chunk_routing_beam_search_with_cache_equals_without(ctx, repo_root, tmp_path):
    """Beam search reorders the cache, memory routing state included; without a cache every step is a
    full forward, which chunk routing makes exact."""
    cfg = tiny_config(repo_root, model={"init_method_std": 0.1}, memory={"routing_unit": "chunk", "routing_chunk": 4})
    hf = export(training_model(ctx, cfg, o_proj_std=0.2), cfg, tmp_path / "out")
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        assert torch.equal(hf.generate(tokens(s=6), **kw), hf.generate(tokens(s=6), use_cache=False, **kw))


def test_sequence_routing_generate_keeps_the_prompts_routing(ctx, repo_root, tmp_path):
    """With a cache, sequence routing routes on the prompt and keeps those chapters (SPEC 1.2). The
    reference recomputes the whole sequence with the training model, its router pinned to the prompt's
    routing. The training model's own full recompute routes on the mean of the whole prefix, generated
    tokens included, so its chapters (and logits) move at every step: not what a cache can reproduce."""
    cfg = tiny_config(repo_root, model={"init_method_std": 0.1})
    model = training_model(ctx, cfg, o_proj_std=0.2)
    hf = export(model, cfg, tmp_path / "out")
    prompt, steps = tokens(b=2, s=7), 10
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=steps, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
        rerouted = greedy(model, prompt, steps)
        prompt_routing = {i: r for i, r in zip(cfg.memory.layers, model(prompt).routings)}
        for i in cfg.memory.layers:
            model.layers[i].memory.router.forward = lambda r, active, i=i: prompt_routing[i]
        pinned = greedy(model, prompt, steps)
    diff = max((a - b).abs().max().item() for a, b in zip(out.scores, pinned[1]))
    drift = max((a - b).abs().max().item() for a, b in zip(rerouted[1], pinned[1]))
    print(f"sequence generate: max |step logit diff| vs pinned routing = {diff:.3g}; "
          f"re-routing on the whole prefix moves logits by up to {drift:.3g}")
    assert torch.equal(out.sequences, pinned[0])
    assert diff <= TOL
    assert drift > 1e-3


def greedy(model, prompt, steps):
    """Greedy decoding by full forwards (no cache): the reference for generate()."""
    seq, step_logits = prompt, []
    for _ in range(steps):
        logits = model(seq).logits[:, -1]
        step_logits.append(logits)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq, step_logits


def test_rolling_inference_routing_routes_each_step_on_recent_states(ctx, repo_root, tmp_path):
    cfg = tiny_config(repo_root, model={"init_method_std": 0.1})
    model = training_model(ctx, cfg, o_proj_std=0.2)
    save_hf(model.state_dict(), cfg.to_dict(), tmp_path / "out")
    w = 3
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True,
                                              inference_routing="rolling", memory_rolling_window=w).eval()
    layer = cfg.memory.layers[1]
    seen = []  # the residual stream entering the memory block, call by call
    hf.model.layers[layer].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    x = tokens(b=2, s=7)
    with torch.no_grad():
        out = hf(x, use_cache=True, output_router_logits=True)
        prompt_chapters, cache, moved = out.router_chapters[1], out.past_key_values, False
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(6):
            out = hf(nxt, past_key_values=cache, use_cache=True, output_router_logits=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            window = torch.cat(seen, 1)[:, -w:].mean(1)                        # (b, d)
            expected = model.layers[layer].memory.router.proj(window).float()
            assert (out.router_logits[1][:, 0] - expected).abs().max().item() <= 1e-5
            moved |= not torch.equal(out.router_chapters[1], prompt_chapters)
    assert moved


def test_vanilla_exports_as_plain_llama(ctx, repo_root, tmp_path):
    cfg = tiny_config(repo_root, "vanilla-tiny")
    model = MoCModel(cfg, ctx).eval()
    save_hf(model.state_dict(), cfg.to_dict(), tmp_path / "out")
    assert not any(name.endswith(".py") for name in os.listdir(tmp_path / "out"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # no remote code
    assert type(hf) is LlamaForCausalLM and hf.config.tie_word_embeddings
    x = tokens()
    with torch.no_grad():
        diff = (hf.eval()(x).logits - model(x).logits).abs().max().item()
    print(f"vanilla: max |logit diff| = {diff:.3g}")
    assert diff <= TOL


def test_save_pretrained_round_trip_and_state_dict_adapter(ctx, repo_root, tmp_path):
    cfg = tiny_config(repo_root, memory={"bank_sharing": "per_layer", "shared_chapters": 2})
    model = training_model(ctx, cfg)
    hf = export(model, cfg, tmp_path / "out")
    hf.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"), trust_remote_code=True).eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(hf(x).logits, again(x).logits)
    back = from_hf(again.state_dict(), cfg.to_dict())
    fresh = MoCModel(cfg, ctx)
    missing, unexpected = fresh.load_state_dict(back, strict=False)
    assert not unexpected and all(name.endswith("_extra_state") for name in missing)
    for name, t in model.state_dict().items():
        if torch.is_tensor(t):
            assert torch.equal(fresh.state_dict()[name], t), name
    assert set(to_hf(model.state_dict(), cfg.to_dict())) == set(again.state_dict()) - {"lm_head.weight"}


def test_output_router_logits_shapes(ctx, repo_root, tmp_path):
    cfg = tiny_config(repo_root, memory={"routing_unit": "chunk", "routing_chunk": 8})
    hf = export(training_model(ctx, cfg), cfg, tmp_path / "out")
    with torch.no_grad():
        out = hf(tokens(s=20), output_router_logits=True)
    n, c = cfg.memory.shared_chapters + cfg.memory.top_k, cfg.memory.chapters
    assert len(out.router_logits) == len(cfg.memory.layers)
    for logits, chapters, weights in zip(out.router_logits, out.router_chapters, out.router_weights):
        assert logits.shape == (2, 3, c) and chapters.shape == (2, 3, n) and weights.shape == (2, 3, n)
        assert torch.equal(chapters[..., 0], torch.zeros(2, 3, dtype=torch.long))  # the shared chapter first
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_mode_loss_and_gradients_equal_training_model(ctx, repo_root, tmp_path, checkpointing):
    """What a transformers Trainer step does: model.train(); model(input_ids, labels).loss.backward()."""
    cfg = tiny_config(repo_root, memory={"routing_unit": "chunk", "routing_chunk": 8})
    model = training_model(ctx, cfg).train()
    hf = export(model, cfg, tmp_path / "out").train()
    if checkpointing:
        enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
        enable()
    seq = tokens(s=SEQ + 1)
    x, y = seq[:, :-1], seq[:, 1:].contiguous()
    ref = model(x, y)
    ref.loss.backward()
    out = hf(input_ids=x, labels=x, shift_labels=y)
    out.loss.backward()
    expected = ref.lm_loss + 0.01 * ref.load_balance_loss + 0.001 * ref.z_loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    hf_names = to_hf({n: p.grad for n, p in model.named_parameters()}, cfg.to_dict())
    worst = max((grads[n] - g).abs().max().item() for n, g in hf_names.items())
    print(f"train mode (checkpointing={checkpointing}): max |grad diff| = {worst:.3g}")
    assert set(grads) == set(hf_names) and worst <= 1e-5


def test_sharded_export_writes_an_index_and_replaces_the_directory_atomically(ctx, repo_root, tmp_path):
    cfg = tiny_config(repo_root)
    model = training_model(ctx, cfg)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    save_hf(model.state_dict(), cfg.to_dict(), out, max_shard_size="1MB", dtype="bf16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "stale.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moc.MoCForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert hf.model.banks[0].weight.dtype == torch.bfloat16
    broken = dict(model.state_dict())
    del broken["norm.weight"]
    with pytest.raises(ValueError, match="norm.weight"):
        save_hf(broken, cfg.to_dict(), tmp_path / "never")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written output, no temporary left behind


# How tools/train_tokenizer.py trains (lossless BPE, chat tokens as pieces), and sentencepiece's defaults.
SPM_SETTINGS = {
    "project_bpe": dict(model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                        user_defined_symbols=["<|user|>", "<|assistant|>", "<|end|>"],
                        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                        allow_whitespace_only_pieces=True, split_digits=True),
    "default_unigram": dict(model_type="unigram"),
}


@pytest.mark.parametrize("name, settings", [("vanilla-tiny", "project_bpe"), ("moc-tiny", "default_unigram")])
def test_tokenizer_round_trip(ctx, repo_root, tmp_path, name, settings):
    """AutoTokenizer reads config.json first, so a MoC export (custom code) needs trust_remote_code=True."""
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = ("memory chapter router bank token model layer attention query key value shared routed "
             "train data read write the a of and to in is Hello 2024 naïve").split()
    lines = [rng.choice(["", " ", "\t"]) + rng.choice([" ", "  ", " "]).join(
        rng.choice(words) for _ in range(rng.randint(2, 12))) + rng.choice(".,!? ") for _ in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   **SPM_SETTINGS[settings])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    cfg = tiny_config(repo_root, name)
    save_hf(training_model(ctx, cfg).state_dict(), cfg.to_dict(), tmp_path / "out",
            tokenizer_model=tmp_path / "sp.model")
    remote = {"trust_remote_code": True} if cfg.has_memory else {}
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"), **remote)
    texts = lines[:50] + ["The Router reads  memory\tchapters\n", "  spaces  ", "ünïcödé → 中文 🙂 ﬁ", "",
                          "x", "digits 1234567890", "a <|user|>hi<|end|>"]
    for text in texts:
        ids = sp.encode(text)
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == sp.decode(ids), text
    assert (tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (sp.eos_id(), sp.bos_id(), sp.unk_id())
    assert tok.pad_token_id == (sp.pad_id() if sp.pad_id() >= 0 else None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == sp.eos_id()
