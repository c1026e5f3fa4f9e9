"""Datasets for the trainer, and which samples each rank reads.

Data order does not depend on the layout: step i's global batch is samples
[consumed + i' * G, consumed + (i' + 1) * G) of the training split (i' = steps since the last resume,
G = global batch); data-parallel rank r reads the r-th contiguous G / dp of them, in micro-batches.
A DP=2 run and a DP=1 run with twice the accumulation therefore see the same samples in each step.
Indices wrap around a dataset shorter than the run (small chat sets), in the same order each epoch.
"""

from __future__ import annotations

from typing import Iterator

import torch

from moc_megatron.config import Config
from moc_megatron.errors import UserError
from moc_megatron.parallel.state import ParallelContext

KEYS = ("tokens", "labels", "loss_mask")


def build_datasets(cfg: Config) -> tuple:
    """(train, valid) map-style datasets whose items are {tokens, labels, loss_mask} of --seq-length;
    valid is None when the split gives it nothing. Call on every rank."""
    from moc_megatron import data

    t = cfg.training
    if sum([bool(t.mock_data), bool(t.data_path), bool(t.chat_data)]) != 1:
        raise UserError("give exactly one source of training data: --mock-data, --data-path or --chat-data")
    sizes = (t.train_iters * t.global_batch_size, t.eval_iters * t.global_batch_size if t.eval_interval else 0, 0)
    if t.mock_data:
        train, valid, _ = data.build_mock_datasets(t.seq_length, sizes, t.seed, cfg.model.vocab_size)
    elif t.chat_data:
        train, valid, _ = data.build_chat_datasets(t.chat_data, t.split, t.seq_length, t.seed, tokenizer(cfg),
                                                   pack=t.chat_pack)
    else:
        train, valid, _ = data.build_pretraining_datasets(t.data_path, t.split, t.seq_length, sizes, t.seed,
                                                          tokenizer(cfg))
    if train is None:
        raise UserError(f"--split {t.split}: the training split is empty")
    return train, valid


def tokenizer(cfg: Config):
    """--tokenizer-type / --tokenizer-model; its vocabulary must fit the model's --vocab-size."""
    from moc_megatron.data import build_tokenizer

    t, vocab = cfg.training, cfg.model.vocab_size
    null_ids = vocab - 1 if t.tokenizer_type == "NullTokenizer" else None  # its end-of-document id is the last
    tok = build_tokenizer(t.tokenizer_type, t.tokenizer_model, null_ids)
    if tok.vocab_size > vocab:
        raise UserError(f"--vocab-size={vocab}: smaller than the tokenizer's vocabulary ({tok.vocab_size})")
    return tok


def step_indices(first_sample: int, cfg: Config, ctx: ParallelContext) -> list[list[int]]:
    """Sample indices of this rank's micro-batches in the step whose global batch starts at first_sample."""
    t = cfg.training
    per_rank = t.global_batch_size // ctx.dp_size
    start = first_sample + ctx.dp_rank * per_rank
    return [list(range(start + a, start + a + t.micro_batch_size)) for a in range(0, per_rank, t.micro_batch_size)]


def micro_batches(dataset, indices: list[list[int]], device) -> Iterator[dict[str, torch.Tensor]]:
    for idx in indices:
        yield collate([dataset[i % len(dataset)] for i in idx], device)


def collate(items: list[dict], device) -> dict[str, torch.Tensor]:
    # tokens, labels: (b, s) int64; loss_mask: (b, s) float
    out = {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in KEYS}
    out["tokens"], out["labels"] = out["tokens"].long(), out["labels"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}
