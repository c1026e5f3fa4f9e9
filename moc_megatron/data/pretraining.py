"""Pretraining samples: megatron-core's GPTDataset and blends over indexed datasets, or mock data.

Every dataset here yields ``{"tokens", "labels", "loss_mask"}``: LongTensor, LongTensor, FloatTensor,
each of length ``seq_length``, with ``labels`` the tokens shifted by one.

``build_pretraining_datasets`` goes through megatron-core's BlendedMegatronDatasetBuilder, so the
``--data-path`` blend, the ``--split`` and the cached document/sample/shuffle indices behave exactly
as in Megatron-LM. Call it on every rank: with torch.distributed initialised, rank 0 builds the cached
indices first and the other ranks read them.
"""

from __future__ import annotations

import copy
import math
import os
import re
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from moc_megatron.data.helpers import ensure_dataset_helpers
from moc_megatron.data.tokenizer import Tokenizer
from moc_megatron.errors import UserError

Splits = tuple[Optional[torch.utils.data.Dataset], Optional[torch.utils.data.Dataset],
               Optional[torch.utils.data.Dataset]]


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """Megatron's ``--data-path``: "w1 p1 w2 p2 ..." or "p1 p2 ..." (items may hold several words)."""
    words = [w for item in data_path for w in item.split()]
    if not words:
        raise UserError("--data-path is empty; give dataset prefixes (or --mock-data)")
    weights = [_number(w) for w in words[0::2]]
    if len(words) % 2 == 0 and all(w is not None for w in weights):
        prefixes = words[1::2]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"--data-path {' '.join(words)}: weights must be >= 0 with a positive sum")
    elif any(_number(w) is not None for w in words):
        raise UserError(f"--data-path {' '.join(words)}: give either only prefixes or weight-prefix pairs")
    else:
        prefixes, weights = words, None
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise UserError(f"--data-path {prefix}: {prefix}.bin and {prefix}.idx not found "
                            "(make them with tools/preprocess_data.py)")
    return prefixes, weights


def _number(word: str) -> Optional[float]:
    try:
        value = float(word)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_split(split: str) -> list[float]:
    """``--split`` "969,30,1" (1 to 3 non-negative weights) as fractions."""
    parts = split.replace("/", ",").split(",")
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\s*\d+(\.\d*)?\s*", p) for p in parts):
        raise UserError(f"--split {split}: expected up to three non-negative numbers, e.g. 969,30,1")
    weights = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if sum(weights) <= 0:
        raise UserError(f"--split {split}: the weights sum to zero")
    return [w / sum(weights) for w in weights]


class SampleView(torch.utils.data.Dataset):
    """A megatron-core dataset's items reduced to tokens, labels and a float loss mask."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        item = self.dataset[idx]
        return {"tokens": item["tokens"].long(), "labels": item["labels"].long(),
                "loss_mask": item["loss_mask"].float()}


def build_pretraining_datasets(data_path: Sequence[str], split: str, seq_length: int,
                               num_samples: tuple[int, int, int], seed: int, tokenizer: Tokenizer,
                               cache_dir: Optional[str] = None) -> Splits:
    """(train, valid, test) GPT datasets over the ``--data-path`` blend; None for a split of weight 0.

    ``num_samples`` is how many samples each split must provide at least (megatron-core repeats
    epochs as needed, and draws from each blended dataset in proportion to its weight; a blend
    without weights is drawn in proportion to the datasets' sizes, one epoch at most). Indices are
    cached in ``cache_dir`` (default: ``cache/`` next to the first dataset) and reused while the
    arguments are unchanged.
    """
    prefixes, weights = parse_data_path(data_path)
    parse_split(split)
    if seq_length < 1 or len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise UserError("seq_length must be positive and num_samples three non-negative counts")
    ensure_dataset_helpers()
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    datasets = _Builder(GPTDataset, list(num_samples), lambda: True, config).build()
    return tuple(SampleView(d) if d is not None and len(d) > 0 else None for d in datasets)


class _Builder(BlendedMegatronDatasetBuilder):
    """megatron-core's builder, usable without torch.distributed.

    megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() whenever it has a cache
    directory, which fails in a process that never initialised torch.distributed; there the blending
    indices (cheap to rebuild) are not cached.
    """

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            config = copy.copy(args[-1])
            config.path_to_cache = None
            args = (*args[:-1], config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks,
                                                                   *args)


class MockDataset(torch.utils.data.Dataset):
    """Deterministic synthetic samples with structure to learn (``--mock-data``).

    A seeded phrasebook of ``PHRASES`` random phrases of ``PHRASE_LENGTH`` tokens (all distinct when the
    vocabulary has room); every sequence is a random chain of phrases starting at a random offset.
    After a phrase's first token the rest is predictable, so a model's loss falls from log(vocab)
    towards log(PHRASES) / PHRASE_LENGTH.
    Sample ``i`` depends only on (seed, split, i), never on access order or the number of ranks.
    """

    PHRASES = 64
    PHRASE_LENGTH = 8

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, split: int = 0) -> None:
        if vocab_size < 2 or seq_length < 1 or num_samples < 0:
            raise UserError("mock data needs vocab_size >= 2, seq_length >= 1 and num_samples >= 0")
        self.num_samples, self.seq_length, self.seed, self.split = num_samples, seq_length, seed, split
        rng = np.random.default_rng([seed, 0x5EED])
        count = self.PHRASES * self.PHRASE_LENGTH  # distinct tokens where the vocabulary allows
        self.phrases = rng.choice(vocab_size, size=count, replace=vocab_size < count).reshape(self.PHRASES, -1)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_samples:
            raise IndexError(idx)
        rng = np.random.default_rng([self.seed, self.split, idx])
        count = -(-(self.seq_length + 1) // self.PHRASE_LENGTH) + 1
        stream = self.phrases[rng.integers(0, self.PHRASES, size=count)].ravel()
        start = int(rng.integers(0, self.PHRASE_LENGTH))
        ids = torch.from_numpy(stream[start:start + self.seq_length + 1].copy())
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.ones(self.seq_length)}


def build_mock_datasets(seq_length: int, num_samples: tuple[int, int, int], seed: int,
                        vocab_size: int) -> Splits:
    """(train, valid, test) MockDatasets sharing one phrasebook, with different samples; None if empty."""
    return tuple(MockDataset(n, seq_length, vocab_size, seed, split) if n > 0 else None
                 for split, n in enumerate(num_samples))
