"""One config system: dataclasses, loaded from YAML, overridden by Megatron-style flags, validated up front.

Every field of a section is one flag: ``model.num_layers`` is ``--num-layers``, ``memory.top_k`` is
``--memory-top-k``, ``parallel.tensor_model_parallel_size`` is ``--tensor-model-parallel-size``,
``training.lr`` is ``--lr``. ``resolve()`` fills derived defaults in one place; ``validate()`` rejects
contradictions with a message naming the flag and its value.

YAML files hold the same sections (``model:``, ``memory:``, ``parallel:``, ``training:``) and may
start from other files with ``include: [relative/path.yaml, ...]`` (later keys win).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml

from moc_megatron.errors import UserError


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its --help text (and choices, checked by validate())."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    num_layers: int = opt(4, "Number of transformer blocks.")
    hidden_size: int = opt(128, "Model width d.")
    num_attention_heads: int = opt(4, "Self-attention query heads.")
    num_query_groups: Optional[int] = opt(None, "Self-attention key/value heads (GQA); default: one per query head.")
    ffn_hidden_size: Optional[int] = opt(None, "SwiGLU inner width; default 4 * hidden size.")
    vocab_size: int = opt(4096, "Vocabulary size (the tokenizer's; padded to a multiple of the TP size).")
    rotary_base: float = opt(100000.0, "RoPE theta.")
    norm_epsilon: float = opt(1e-6, "RMSNorm epsilon.")
    init_method_std: float = opt(0.02, "Std of the normal init of every projection and the embedding.")
    recompute_activations: bool = opt(False, "Activation checkpointing: recompute each block in backward.")


@dataclass
class MemoryConfig:
    layers: list = opt([], "0-based indices of memory blocks; empty for a vanilla transformer.")
    tokens: int = opt(8192, "Bank size N_m in latent tokens.")
    chapters: int = opt(128, "Number of chapters C (divides --memory-tokens).")
    shared_chapters: int = opt(1, "Chapters every routing unit reads (the first ones of the bank).")
    top_k: int = opt(8, "Routed chapters per routing unit.")
    num_heads: Optional[int] = opt(None, "Memory-attention query heads; default --num-attention-heads.")
    num_kv_heads: Optional[int] = opt(None, "Memory-attention key/value heads; default --memory-num-heads.")
    routed_scaling_factor: float = opt(2.5, "Routed weights are scaled by this before mixing with shared ones.")
    normalize_before_mixing: bool = opt(True, "RMS-normalise each memory token (no gain) before weighting.")
    bank_sharing: str = opt("global", "One bank for all memory layers, or one per layer.", ("global", "per_layer"))
    bank_init_std: float = opt(0.02, "Std of the bank's normal init.")
    pooling: str = opt("mean", "Router pooling over the routing unit's context.", ("mean", "rolling"))
    rolling_window: int = opt(64, "Window w of --memory-pooling rolling.")
    routing_unit: str = opt("sequence", "sequence: the paper (sees the future); chunk: causal.", ("sequence", "chunk"))
    routing_chunk: int = opt(128, "Chunk length c of --memory-routing-unit chunk.")
    first_chunk: str = opt("first_token", "Chunk 0 routes on its first token, or reads shared chapters only.",
                           ("first_token", "shared_only"))
    load_balance_coeff: float = opt(0.01, "Weight of the load-balance loss.")
    z_loss_coeff: float = opt(0.001, "Weight of the router z-loss.")
    load_balance_form: str = opt("normalized", "normalized: minimum 1 over routed chapters; authors: P over all "
                                 "chapters, minimum k.", ("normalized", "authors"))
    aux_loss_dp_average: bool = opt(True, "Average routing statistics f and P over the data-parallel group.")
    recompute_kv: bool = opt(False, "Recompute the selected chapters' K/V in backward instead of keeping them "
                                    "(they grow with the distinct chapters read: most under chunk routing).")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = opt(1, "Tensor-parallel size (heads, MLP, vocabulary).")
    pipeline_model_parallel_size: int = opt(1, "Pipeline stages.")
    expert_model_parallel_size: int = opt(1, "Chapter-parallel (expert-parallel) size; divides the DP size.")


@dataclass
class TrainingConfig:
    seq_length: int = opt(256, "Tokens per sequence.")
    micro_batch_size: int = opt(4, "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: Optional[int] = opt(None, "Sequences per optimizer step; default micro batch x DP size.")
    train_iters: int = opt(100, "Optimizer steps.")
    lr: float = opt(3e-4, "Peak learning rate of the backbone.")
    min_lr: float = opt(3e-5, "Learning rate at the end of decay.")
    lr_warmup_iters: int = opt(0, "Linear warmup steps.")
    lr_decay_style: str = opt("cosine", "Schedule after warmup.", ("constant", "linear", "cosine", "WSD"))
    lr_decay_iters: Optional[int] = opt(None, "Steps over which to decay; default --train-iters.")
    lr_wsd_decay_iters: Optional[int] = opt(None, "WSD: steps of the final decay phase.")
    memory_layer_lr: Optional[float] = opt(None, "Learning rate of memory-layer parameters; default --lr.")
    memory_bank_lr: Optional[float] = opt(None, "Learning rate of the bank; default --lr.")
    freeze_memory_bank: bool = opt(False, "Keep the bank fixed (instruction tuning).")
    memory_bank_optimizer: str = opt("adamw", "sparse_adam updates only the chapters a step read.",
                                     ("adamw", "sparse_adam"))
    weight_decay: float = opt(0.1, "AdamW weight decay (not on norms, biases or the router bias).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.95, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    clip_grad: float = opt(1.0, "Global gradient-norm clip; 0 disables.")
    bf16: bool = opt(False, "bf16 mixed precision where the device supports it.")
    seed: int = opt(1234, "Seed of weights, data order and everything random.")
    data_path: list = opt([], "Megatron indexed dataset prefixes, optionally weighted: [w1] p1 [w2] p2 ...")
    split: str = opt("969,30,1", "Train/valid/test split weights.")
    mock_data: bool = opt(False, "Deterministic synthetic tokens instead of --data-path.")
    eval_interval: int = opt(100, "Evaluate every N steps; 0 disables.")
    eval_iters: int = opt(10, "Validation batches per evaluation.")
    save: Optional[str] = opt(None, "Checkpoint directory to write.")
    save_interval: int = opt(0, "Save every N steps (and at the end); 0 saves at the end only.")
    load: Optional[str] = opt(None, "Checkpoint directory to resume from.")
    keep_last: int = opt(0, "Keep only the newest K checkpoints; 0 keeps all.")
    finetune: bool = opt(False, "With --load: take weights only (new optimizer, schedule and data position).")
    exit_interval: Optional[int] = opt(None, "Stop (saving with --save, exit 0) after the step whose iteration "
                                       "is a multiple of N.")
    exit_duration_in_mins: Optional[float] = opt(None, "Stop (saving with --save, exit 0) at the first step boundary "
                                                 "M minutes after the trainer started in this job.")
    exit_signal_handler: bool = opt(False, "On --exit-signal, finish the step, save (with --save) and exit 0.")
    exit_signal: str = opt("SIGTERM", "The signal of --exit-signal-handler (SIGUSR1 for SLURM's --signal).",
                           ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"))
    tensorboard_dir: Optional[str] = opt(None, "TensorBoard event directory.")
    log_interval: int = opt(10, "Print and log every N steps.")
    log_jsonl: Optional[str] = opt(None, "Write one JSON object per logged step and evaluation.")
    peak_tflops: Optional[float] = opt(None, "Per-device peak TFLOP/s for MFU; default the device's known peak.")
    zero_stage: int = opt(1, "DeepSpeed ZeRO stage.", (0, 1, 2))
    deepspeed_config: Optional[str] = opt(None, "DeepSpeed JSON; flags fill what it leaves out.")
    nan_policy: str = opt("stop", "On a NaN/inf loss: stop naming the step, or skip the update.", ("stop", "skip"))
    tokenizer_type: str = opt("NullTokenizer", "Tokenizer of --data-path / --chat-data.",
                              ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"))
    tokenizer_model: Optional[str] = opt(None, "Tokenizer file or directory (SentencePiece .model, HF dir).")
    chat_data: list = opt([], "Instruction tuning: chat JSONL file(s) of {\"messages\": [{role, content}]}.")
    chat_pack: bool = opt(True, "Pack conversations back to back into --seq-length windows; "
                          "--no-chat-pack pads one conversation per sample.")


SECTIONS: dict[str, type] = {"model": ModelConfig, "memory": MemoryConfig,
                             "parallel": ParallelConfig, "training": TrainingConfig}
FLAG_PREFIX = {"model": "", "memory": "memory-", "parallel": "", "training": ""}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    # ---- derived quantities (one place) ----
    @property
    def has_memory(self) -> bool:
        return len(self.memory.layers) > 0

    @property
    def head_dim(self) -> int:
        return self.model.hidden_size // self.model.num_attention_heads

    @property
    def memory_head_dim(self) -> int:
        return self.model.hidden_size // self.memory.num_heads

    @property
    def chapter_tokens(self) -> int:
        return self.memory.tokens // self.memory.chapters

    @property
    def routed_chapters(self) -> int:
        return self.memory.chapters - self.memory.shared_chapters

    @property
    def num_banks(self) -> int:
        if not self.has_memory:
            return 0
        return 1 if self.memory.bank_sharing == "global" else len(self.memory.layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- defaults and checks ----
    def resolve(self) -> "Config":
        """Fill every derived default. Idempotent."""
        m, mem, t = self.model, self.memory, self.training
        if m.num_query_groups is None:
            m.num_query_groups = m.num_attention_heads
        if m.ffn_hidden_size is None:
            m.ffn_hidden_size = 4 * m.hidden_size
        if mem.num_heads is None:
            mem.num_heads = m.num_attention_heads
        if mem.num_kv_heads is None:
            mem.num_kv_heads = mem.num_heads
        mem.layers = sorted(int(i) for i in mem.layers)
        if t.lr_decay_iters is None:
            t.lr_decay_iters = t.train_iters
        if t.memory_layer_lr is None:
            t.memory_layer_lr = t.lr
        if t.memory_bank_lr is None:
            t.memory_bank_lr = t.lr
        return self

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Raise UserError naming the first impossible setting. ``world_size`` enables layout checks."""
        self.resolve()
        _check_choices(self)
        _check_model(self)
        if self.has_memory:
            _check_memory(self)
        _check_parallel(self, world_size)
        _check_training(self)
        return self


def _fail(flag: str, value: Any, why: str) -> None:
    raise UserError(f"--{flag}={_show(value)}: {why}")


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _check_choices(cfg: Config) -> None:
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            if choices and getattr(obj, f.name) not in choices:
                _fail(flag_name(section, f.name), getattr(obj, f.name),
                      f"must be one of {', '.join(map(str, choices))}")


def _check_model(cfg: Config) -> None:
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "vocab_size"):
        if getattr(m, name) < 1:
            _fail(flag_name("model", name), getattr(m, name), "must be at least 1")
    if m.hidden_size % m.num_attention_heads:
        _fail("hidden-size", m.hidden_size, f"not divisible by --num-attention-heads={m.num_attention_heads}")
    if (m.hidden_size // m.num_attention_heads) % 2:
        _fail("num-attention-heads", m.num_attention_heads, "head dimension must be even for rotary embeddings")
    if m.num_attention_heads % m.num_query_groups:
        _fail("num-attention-heads", m.num_attention_heads,
              f"not divisible by --num-query-groups={m.num_query_groups}")
    if m.num_query_groups % tp:
        _fail("num-query-groups", m.num_query_groups, f"not divisible by --tensor-model-parallel-size={tp}")
    if m.ffn_hidden_size % tp:
        _fail("ffn-hidden-size", m.ffn_hidden_size, f"not divisible by --tensor-model-parallel-size={tp}")


def _check_memory(cfg: Config) -> None:
    mem, m, tp = cfg.memory, cfg.model, cfg.parallel.tensor_model_parallel_size
    bad = [i for i in mem.layers if not 0 <= i < m.num_layers]
    if bad:
        _fail("memory-layers", mem.layers, f"index {bad[0]} out of range for --num-layers={m.num_layers}")
    if len(set(mem.layers)) != len(mem.layers):
        _fail("memory-layers", mem.layers, "repeats a layer")
    if mem.chapters < 1 or mem.tokens < 1:
        _fail("memory-chapters", mem.chapters, "bank needs at least one chapter and one token")
    if mem.tokens % mem.chapters:
        _fail("memory-tokens", mem.tokens, f"not divisible by --memory-chapters={mem.chapters}")
    if not 0 <= mem.shared_chapters <= mem.chapters:
        _fail("memory-shared-chapters", mem.shared_chapters, f"must be in [0, --memory-chapters={mem.chapters}]")
    routed = cfg.routed_chapters
    if mem.top_k < 0 or mem.top_k > routed:
        _fail("memory-top-k", mem.top_k, f"must be in [0, routed chapters = {mem.chapters} - "
              f"{mem.shared_chapters} shared = {routed}]")
    if mem.top_k == 0 and mem.shared_chapters == 0:
        _fail("memory-top-k", 0, "with no shared chapters the memory read would be empty")
    if m.hidden_size % mem.num_heads:
        _fail("memory-num-heads", mem.num_heads, f"does not divide --hidden-size={m.hidden_size}")
    if mem.num_heads % mem.num_kv_heads:
        _fail("memory-num-heads", mem.num_heads, f"not divisible by --memory-num-kv-heads={mem.num_kv_heads}")
    if mem.num_kv_heads % tp:
        _fail("memory-num-kv-heads", mem.num_kv_heads, f"not divisible by --tensor-model-parallel-size={tp}")
    if mem.routed_scaling_factor <= 0:
        _fail("memory-routed-scaling-factor", mem.routed_scaling_factor, "must be positive")
    if mem.pooling == "rolling" and mem.rolling_window < 1:
        _fail("memory-rolling-window", mem.rolling_window, "must be at least 1")
    if mem.routing_unit == "chunk" and mem.first_chunk == "shared_only" and mem.shared_chapters == 0:
        _fail("memory-first-chunk", "shared_only", "needs --memory-shared-chapters of at least 1")
    if mem.routing_unit == "chunk" and mem.routing_chunk < 1:
        _fail("memory-routing-chunk", mem.routing_chunk, "must be at least 1")


def _check_parallel(cfg: Config, world_size: Optional[int]) -> None:
    p = cfg.parallel
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if getattr(p, name) < 1:
            _fail(flag_name("parallel", name), getattr(p, name), "must be at least 1")
    if p.pipeline_model_parallel_size > cfg.model.num_layers:
        _fail("pipeline-model-parallel-size", p.pipeline_model_parallel_size,
              f"more stages than --num-layers={cfg.model.num_layers}")
    ep = p.expert_model_parallel_size
    if ep > 1 and cfg.has_memory and cfg.routed_chapters % ep:
        _fail("expert-model-parallel-size", ep, f"does not divide the {cfg.routed_chapters} routed chapters")
    if ep > 1 and not cfg.has_memory:
        _fail("expert-model-parallel-size", ep, "chapter parallelism needs memory layers (--memory-layers)")
    if ep > 1 and cfg.training.zero_stage == 0:
        _fail("zero-stage", 0, "chapter parallelism needs ZeRO stage 1 or 2, so that each rank's optimizer "
              "state for its chapters is checkpointed")
    if p.pipeline_model_parallel_size > 1 and cfg.training.zero_stage > 1:
        _fail("zero-stage", cfg.training.zero_stage, "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
    if world_size is None:
        return
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if world_size % mp:
        _fail("tensor-model-parallel-size", p.tensor_model_parallel_size,
              f"TP x PP = {mp} does not divide the world size {world_size}")
    dp = world_size // mp
    if dp % ep:
        _fail("expert-model-parallel-size", ep, f"does not divide the data-parallel size {dp}")
    t = cfg.training
    if t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * dp):
        _fail("global-batch-size", t.global_batch_size,
              f"not divisible by --micro-batch-size={t.micro_batch_size} x data-parallel size {dp}")


def _check_training(cfg: Config) -> None:
    t = cfg.training
    for name in ("seq_length", "micro_batch_size", "train_iters"):
        if getattr(t, name) < 1:
            _fail(flag_name("training", name), getattr(t, name), "must be at least 1")
    if t.lr_decay_style == "WSD" and t.lr_wsd_decay_iters is None:
        _fail("lr-decay-style", "WSD", "needs --lr-wsd-decay-iters")
    if t.lr_warmup_iters > t.lr_decay_iters:
        _fail("lr-warmup-iters", t.lr_warmup_iters, f"longer than --lr-decay-iters={t.lr_decay_iters}")
    if t.min_lr > t.lr:
        _fail("min-lr", t.min_lr, f"above --lr={t.lr}")
    if t.exit_interval is not None and t.exit_interval < 1:
        _fail("exit-interval", t.exit_interval, "must be at least 1")
    if t.exit_duration_in_mins is not None and t.exit_duration_in_mins <= 0:
        _fail("exit-duration-in-mins", t.exit_duration_in_mins, "must be positive")
    if t.freeze_memory_bank and not cfg.has_memory:
        _fail("freeze-memory-bank", True, "the model has no memory bank")
    if cfg.has_memory and cfg.memory.routing_unit == "chunk" and t.seq_length % cfg.memory.routing_chunk:
        _fail("memory-routing-chunk", cfg.memory.routing_chunk,
              f"does not divide --seq-length={t.seq_length}")


# ---------------------------------------------------------------------------------------------
# YAML


def load_yaml(path: str | Path) -> dict:
    """Read a config file, following ``include:`` (paths relative to the file), into nested dicts."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (model, memory, parallel, training)")
    merged: dict = {}
    includes = raw.pop("include", [])
    for inc in [includes] if isinstance(includes, str) else includes:
        _merge(merged, load_yaml(path.parent / inc))
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UserError(f"{path}: unknown section '{section}' (expected one of {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise UserError(f"{path}: section '{section}' must be a mapping")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key in values:
            if key not in known:
                raise UserError(f"{path}: unknown key '{section}.{key}' (flag --{flag_name(section, key)})")
    _merge(merged, raw)
    return merged


def _merge(into: dict, new: dict) -> None:
    for section, values in new.items():
        into.setdefault(section, {}).update(values)


def from_dict(d: dict) -> Config:
    cfg = Config()
    for section, values in d.items():
        obj = getattr(cfg, section)
        for key, value in values.items():
            setattr(obj, key, value)
    return cfg


# ---------------------------------------------------------------------------------------------
# Megatron-style flags


def flag_name(section: str, name: str) -> str:
    return FLAG_PREFIX[section] + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --config and one flag per config field. Unset flags stay absent from the namespace."""
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="Config file(s); later files and then flags override earlier ones.")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_flag(group, section, f, hints[f.name])
    return parser


def _add_flag(group, section: str, f: dataclasses.Field, hint: Any) -> None:
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f"{section}.{f.name}",
                          "help": f.metadata.get("help", "")}
    base = _base_type(hint)
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif base is list:
        kw["nargs"] = "*"
        kw["type"] = int if (section, f.name) == ("memory", "layers") else str
    else:
        kw["type"] = base
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
    group.add_argument("--" + flag_name(section, f.name), **kw)


def _base_type(hint: Any) -> type:
    if get_origin(hint) is not None and type(None) in get_args(hint):  # Optional[X]
        hint = next(a for a in get_args(hint) if a is not type(None))
    return get_origin(hint) or hint


def config_from_args(args: argparse.Namespace, between: dict | None = None) -> Config:
    """YAML files in order, then ``between`` (sections of settings from elsewhere, e.g. a Hugging Face
    model's config), then the flags that were given; resolved but not yet validated."""
    merged: dict = {}
    for path in getattr(args, "config", []) or []:
        _merge(merged, load_yaml(path))
    _merge(merged, between or {})
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            merged.setdefault(section, {})[name] = value
    return from_dict(merged).resolve()


def parse_config(argv: list[str] | None = None, prog: str | None = None) -> Config:
    parser = add_config_args(argparse.ArgumentParser(prog=prog))
    return config_from_args(parser.parse_args(argv))


def load_config(*paths: str | Path, **overrides: dict) -> Config:
    """Programmatic twin of the CLI: ``load_config("moc-tiny.yaml", memory={"top_k": 4})``."""
    merged: dict = {}
    for p in paths:
        _merge(merged, load_yaml(p))
    _merge(merged, overrides)
    return from_dict(merged).resolve()

