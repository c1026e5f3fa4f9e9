"""The state-dict adapter between the training model and Hugging Face, and the export writer (SPEC 2.4).

    to_hf(state_dict, cfg_dict)      training names -> HF names (MoCForCausalLM, or LlamaForCausalLM for vanilla)
    from_hf(hf_state_dict, cfg_dict) HF names -> training names
    hf_config(cfg_dict)              MoCConfig with auto_map, or LlamaConfig for vanilla models
    save_hf(full_state_dict, cfg_dict, out_dir, ...)   one complete HF directory, written atomically

``cfg_dict`` is the training Config as a dict (``Config.to_dict()``: sections model / memory / parallel /
training); ``state_dict`` is the full (single-process, TP=1, EP=1 layout) training state dict. Both models
use the same module names below the HF ``model.`` prefix and the output head is tied to the embedding, so
the mapping is the prefix (the vanilla names are exactly LlamaForCausalLM's), except the bank: training
keeps ``banks.{j}.shared`` (n_shared, t, d) and ``banks.{j}.routed`` (c - n_shared, t, d) apart for
chapter parallelism; HF holds one ``model.banks.{j}.weight`` (c, t, d), shared chapters first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, PretrainedConfig

from moc_megatron.files import as_umask_allows
from moc_megatron.hf.configuration_moc import MoCConfig

HF_PREFIX = "model."
TIED_HEAD = "lm_head.weight"
MODELING_FILES = ("configuration_moc.py", "modeling_moc.py")
AUTO_MAP = {"AutoConfig": "configuration_moc.MoCConfig", "AutoModelForCausalLM": "modeling_moc.MoCForCausalLM"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Names


def is_vanilla(cfg_dict: dict) -> bool:
    return not cfg_dict.get("memory", {}).get("layers")


def to_hf(state_dict: dict, cfg_dict: dict) -> dict:
    """Training names -> HF names; megatron ``_extra_state`` entries are dropped, the tied head is not written."""
    merged = _merge_banks({n: t for n, t in state_dict.items() if not n.endswith("_extra_state")})
    check_names(set(merged), cfg_dict, "training state dict")
    _check_shapes(merged, cfg_dict)
    return {HF_PREFIX + name: t for name, t in merged.items()}


def from_hf(hf_state_dict: dict, cfg_dict: dict) -> dict:
    """HF names -> training names (``lm_head.weight``, tied to the embedding, is dropped)."""
    out = {}
    for name, t in hf_state_dict.items():
        if name == TIED_HEAD:
            continue
        if not name.startswith(HF_PREFIX):
            raise ValueError(f"unexpected Hugging Face weight {name!r}: MoC/Llama names start with {HF_PREFIX!r}")
        out[name[len(HF_PREFIX):]] = t
    check_names(set(out), cfg_dict, "Hugging Face state dict")
    return _split_banks(out, cfg_dict.get("memory", {}).get("shared_chapters", 0))


def _merge_banks(sd: dict) -> dict:
    """banks.{j}.shared + banks.{j}.routed -> banks.{j}.weight (c, t, d)."""
    out = {n: t for n, t in sd.items() if not n.endswith((".shared", ".routed"))}
    for name in sd:
        if name.startswith("banks.") and name.endswith(".routed"):
            j = name.split(".")[1]
            parts = [sd[p] for p in (f"banks.{j}.shared", name) if p in sd]
            out[f"banks.{j}.weight"] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


def _split_banks(sd: dict, n_shared: int) -> dict:
    """banks.{j}.weight (c, t, d) -> banks.{j}.shared (if any shared chapters) + banks.{j}.routed."""
    out = {}
    for name, t in sd.items():
        if name.startswith("banks.") and name.endswith(".weight"):
            stem = name[: -len(".weight")]
            if n_shared:
                out[stem + ".shared"] = t[:n_shared]
            out[stem + ".routed"] = t[n_shared:]
        else:
            out[name] = t
    return out


def training_names(cfg_dict: dict) -> set[str]:
    """Every parameter name of the training model (TP=1 layout, one bank tensor) for this configuration."""
    m, mem = _model_section(cfg_dict), cfg_dict.get("memory", {})
    layers = set(mem.get("layers") or [])
    names = {"embed_tokens.weight", "norm.weight"}
    for i in range(m["num_layers"]):
        p = f"layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        if i in layers:
            names |= {p + "memory.router.proj.weight", p + "memory.router.proj.bias",
                      p + "memory.memory_layernorm.weight"}
            names |= {p + f"memory.memory_attn.{x}_proj.weight" for x in "qkvo"}
    n_banks = 0 if not layers else 1 if mem.get("bank_sharing", "global") == "global" else len(layers)
    return names | {f"banks.{j}.weight" for j in range(n_banks)}


def check_names(got: set, cfg_dict: dict, what: str) -> None:
    want = training_names(cfg_dict)
    missing, extra = sorted(want - got), sorted(got - want)
    if missing or extra:
        raise ValueError(f"{what} does not match the model configuration: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (check --memory-layers, --num-layers, --memory-bank-sharing)")


def _check_shapes(sd: dict, cfg_dict: dict) -> None:
    """The tensors a merge of a parallel layout gets wrong first: the (padded) vocabulary and the banks."""
    m, mem = _model_section(cfg_dict), cfg_dict.get("memory", {})
    want = {"embed_tokens.weight": (m["padded_vocab_size"], m["hidden_size"])}
    for name in sd:
        if name.startswith("banks."):
            want[name] = (mem["chapters"], mem["tokens"] // mem["chapters"], m["hidden_size"])
    for name, shape in want.items():
        if tuple(sd[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(sd[name].shape)}, the configuration needs {shape} "
                             "(is the state dict merged from every tensor- and chapter-parallel rank?)")


# ---------------------------------------------------------------------------------------------
# Config


def _model_section(cfg_dict: dict) -> dict:
    """The model section with the training config's derived defaults filled in (as Config.resolve())."""
    m = dict(cfg_dict["model"])
    m["num_query_groups"] = m.get("num_query_groups") or m["num_attention_heads"]
    m["ffn_hidden_size"] = m.get("ffn_hidden_size") or 4 * m["hidden_size"]
    tp = cfg_dict.get("parallel", {}).get("tensor_model_parallel_size", 1)
    m["padded_vocab_size"] = -(-m["vocab_size"] // tp) * tp  # the training embedding's rows
    return m


def hf_config(cfg_dict: dict) -> PretrainedConfig:
    """MoCConfig (loaded through auto_map with trust_remote_code) or, for vanilla models, a LlamaConfig."""
    m = _model_section(cfg_dict)
    common = dict(
        vocab_size=m["padded_vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_query_groups"], rms_norm_eps=m["norm_epsilon"], rope_theta=m["rotary_base"],
        max_position_embeddings=cfg_dict.get("training", {}).get("seq_length", 2048),
        initializer_range=m["init_method_std"], tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    if is_vanilla(cfg_dict):
        config = LlamaConfig(**common, head_dim=m["hidden_size"] // m["num_attention_heads"], hidden_act="silu",
                             attention_bias=False, mlp_bias=False)
        config.architectures = ["LlamaForCausalLM"]
        return config
    mem = cfg_dict["memory"]
    config = MoCConfig(
        **common,
        memory_layers=mem["layers"], memory_chapters=mem["chapters"],
        memory_chapter_tokens=mem["tokens"] // mem["chapters"], memory_shared_chapters=mem["shared_chapters"],
        memory_top_k=mem["top_k"], memory_num_heads=mem.get("num_heads"), memory_num_kv_heads=mem.get("num_kv_heads"),
        memory_routed_scaling_factor=mem["routed_scaling_factor"],
        memory_normalize_before_mixing=mem["normalize_before_mixing"], memory_bank_sharing=mem["bank_sharing"],
        memory_bank_init_std=mem["bank_init_std"], memory_pooling=mem["pooling"],
        memory_rolling_window=mem["rolling_window"], memory_routing_unit=mem["routing_unit"],
        memory_routing_chunk=mem["routing_chunk"], memory_first_chunk=mem["first_chunk"],
        memory_load_balance_coeff=mem["load_balance_coeff"], memory_z_loss_coeff=mem["z_loss_coeff"],
        memory_load_balance_form=mem["load_balance_form"])
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MoCForCausalLM"]
    return config


# ---------------------------------------------------------------------------------------------
# Tokenizer: a sentencepiece model as a `tokenizers` tokenizer that encodes the same ids


def spm_tokenizer(model_path: str | Path):
    """A PreTrainedTokenizerFast equivalent to the sentencepiece model (unigram or BPE, byte fallback),
    with its unk/bos/eos/pad pieces as special tokens; like the training data, no BOS/EOS is added."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    vocab = [(p.piece, p.score) for p in proto.pieces]
    if trainer.model_type == 1:  # unigram
        model = Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 2:  # bpe
        ids = {piece: i for i, (piece, _) in enumerate(vocab)}
        merges = generate_merges(ids, vocab, skip_tokens=[p.piece for p in proto.pieces if p.type != 1])
        model = BPE(ids, merges, unk_token=proto.pieces[trainer.unk_id].piece, fuse_unk=True,
                    byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"{model_path}: sentencepiece model type {trainer.model_type} is not unigram or bpe")
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(content=" ", left=1)] if norm.add_dummy_prefix else []))
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == 4])
    special = {name: proto.pieces[i].piece for name, i in (("unk_token", trainer.unk_id), ("bos_token", trainer.bos_id),
                                                           ("eos_token", trainer.eos_id), ("pad_token", trainer.pad_id))
               if i >= 0}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)


# ---------------------------------------------------------------------------------------------
# The export directory


def save_hf(full_state_dict: dict, cfg_dict: dict, out_dir: str | Path, tokenizer_model: str | Path | None = None,
            dtype: str = "fp32", max_shard_size: int | str = "2GB") -> Path:
    """Write config.json, model.safetensors (sharded with an index above max_shard_size), the modeling code
    (MoC only), generation_config.json and, given a sentencepiece model, the tokenizer files. Everything is
    written into a temporary directory next to out_dir and renamed into place at the end; an existing
    out_dir is replaced."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    as_umask_allows(tmp)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        config = hf_config(cfg_dict)
        config.dtype = DTYPES[dtype]
        if tokenizer_model is not None:
            _write_tokenizer(tokenizer_model, config, tmp)
        config.save_pretrained(tmp)
        _generation_config(config).save_pretrained(tmp)
        weights = {n: _owned(t.to(DTYPES[dtype])) for n, t in to_hf(full_state_dict, cfg_dict).items()}
        _write_weights(weights, tmp, max_shard_size)
        if not is_vanilla(cfg_dict):
            for name in MODELING_FILES:
                shutil.copyfile(Path(__file__).with_name(name), tmp / name)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer(model_path, config: PretrainedConfig, out: Path) -> None:
    tok = spm_tokenizer(model_path)
    tok.save_pretrained(out)
    shutil.copyfile(model_path, out / "tokenizer.model")  # the original, for sentencepiece users
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def _generation_config(config: PretrainedConfig) -> GenerationConfig:
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=pad)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own storage (safetensors refuses views of larger or shared storage)."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _write_weights(weights: dict, out: Path, max_shard_size) -> None:
    split = split_torch_state_dict_into_shards(weights, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: weights[n] for n in names}, out / filename, metadata={"format": "pt"})
        as_umask_allows(out / filename)  # safetensors writes through a private (0600) temporary file
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _replace_dir(new: Path, out: Path) -> None:
    """Move new into out's place; a previous out is moved aside first and removed last."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The way back: an exported MoC model, or a Llama model, read as training config and weights


def config_from_hf(config: dict, source: str = "config.json") -> dict:
    """The model and memory sections of a training config for a Hugging Face config.json (as a dict):
    the inverse of ``hf_config``. Llama features the training model does not have are refused."""
    kind = config.get("model_type")
    if kind not in ("moc", "llama"):
        raise ValueError(f"{source}: model_type {kind!r} is not 'moc' or 'llama'")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    unsupported = {
        "rope scaling": rope.get("rope_type", rope.get("type", "default")) not in ("default", None),
        "attention_bias": config.get("attention_bias", False),
        "mlp_bias": config.get("mlp_bias", False),
        f"hidden_act {config.get('hidden_act')!r} (SwiGLU needs 'silu')": config.get("hidden_act", "silu") != "silu",
        "head_dim other than hidden_size / num_attention_heads":
            config.get("head_dim") not in (None, config["hidden_size"] // config["num_attention_heads"]),
    }
    bad = [what for what, present in unsupported.items() if present]
    if bad:
        raise ValueError(f"{source}: the training model has no {', '.join(bad)}")
    model = {"num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
             "num_attention_heads": config["num_attention_heads"],
             "num_query_groups": config.get("num_key_value_heads") or config["num_attention_heads"],
             "ffn_hidden_size": config["intermediate_size"], "vocab_size": config["vocab_size"],
             "rotary_base": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
             "norm_epsilon": config["rms_norm_eps"], "init_method_std": config.get("initializer_range", 0.02)}
    if kind == "llama":
        return {"model": model, "memory": {"layers": []}}
    memory = {k[len("memory_"):]: v for k, v in config.items() if k.startswith("memory_")}
    memory["tokens"] = memory.pop("chapter_tokens") * memory["chapters"]
    return {"model": model, "memory": memory}


class HFWeights:
    """The safetensors weights of a Hugging Face directory (one file or sharded with an index), read
    lazily: ``slice(name, dim, start, stop)`` reads only the rows (or columns) a rank holds."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index, single = self.dir / "model.safetensors.index.json", self.dir / "model.safetensors"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif single.exists():
            files = [single.name]
        else:
            raise ValueError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                             "(convert .bin weights with save_pretrained(safe_serialization=True) first)")
        self._files = {name: safe_open(str(self.dir / name), framework="pt") for name in files}
        self.where = {key: f for name, f in self._files.items() for key in f.keys()}

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        s = self.where[name].get_slice(name)
        return s[start:stop] if dim == 0 else s[(slice(None),) * dim + (slice(start, stop),)]
