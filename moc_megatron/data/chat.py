"""Instruction-tuning samples from chat JSONL, with the loss on assistant tokens only.

Each input line is ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``.
The chat template, in tokens (role and end tokens are single tokens, tokenizer.CHAT_TOKENS):

    <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ... <eod>

``labels[i]`` is the token after ``tokens[i]``, and ``loss_mask[i]`` is 1 exactly when ``labels[i]`` is
an assistant content token or the ``<|end|>`` closing an assistant turn: the model learns to write the
answers and to stop, and is never trained to imitate the user or the system, or to predict the
template tokens it is given. Conversations are tokenised up front (instruction sets are small) and
either packed back to back into ``seq_length + 1``-token windows, or padded one per sample.
"""

from __future__ import annotations

import json
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from moc_megatron.data.inputs import decode_line, expand_inputs, input_format, iter_lines
from moc_megatron.data.pretraining import Splits, parse_split
from moc_megatron.data.tokenizer import Tokenizer
from moc_megatron.errors import UserError

ROLES = ("system", "user", "assistant")


def read_conversations(paths: Sequence[str]) -> Iterator[list[dict]]:
    """The validated message lists of chat JSONL files; a UserError names the file and line of a bad one."""
    for path in paths:
        if input_format(path, "--data-path") != "json":
            raise UserError(f"--data-path {path}: chat data must be JSONL (.jsonl/.json, optionally .gz)")
        for number, raw in iter_lines(path):
            text = decode_line(path, number, raw)
            if text.strip():
                yield _messages(text, f"{path}:{number}")


def _messages(text: str, where: str) -> list[dict]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i}: role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i}: content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing to train on")
    return messages


def encode_conversation(tokenizer: Tokenizer, messages: list[dict],
                        contents: Optional[list[Sequence[int]]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, target) of one conversation in the template; ``target[j]`` is 1 where the model learns ``ids[j]``.

    ``contents`` may hold the messages' already tokenised contents (batched by the caller).
    """
    special = tokenizer.chat_tokens
    if contents is None:
        contents = [tokenizer.tokenize(m["content"]) for m in messages]
    ids, target = [], []
    for message, content in zip(messages, contents):
        learn = int(message["role"] == "assistant")
        ids += [special[message["role"]], *content, special["end"]]
        target += [0] + [learn] * (len(content) + 1)
    ids.append(tokenizer.eod)
    target.append(0)
    return np.asarray(ids, dtype=np.int64), np.asarray(target, dtype=np.uint8)


def encode_conversations(tokenizer: Tokenizer, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``encode_conversation`` for many, tokenising all message contents in one batch."""
    flat = tokenizer.tokenize_batch([m["content"] for c in conversations for m in c])
    encoded, at = [], 0
    for messages in conversations:
        encoded.append(encode_conversation(tokenizer, messages, flat[at:at + len(messages)]))
        at += len(messages)
    return encoded


class ChatDataset(torch.utils.data.Dataset):
    """Samples ``{"tokens", "labels", "loss_mask"}`` of length ``seq_length`` from encoded conversations.

    ``pack=True``: conversations back to back, cut into windows of ``seq_length + 1`` tokens (the last
    partial window dropped). ``pack=False``: one conversation per sample, cut to ``seq_length + 1``
    tokens (``truncated`` counts those) and padded with loss mask 0.
    """

    def __init__(self, encoded: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int,
                 pack: bool = True) -> None:
        if seq_length < 1:
            raise UserError("seq_length must be positive")
        self.seq_length, self.pad_id, self.pack = seq_length, pad_id, pack
        self.ids = np.concatenate([ids for ids, _ in encoded]) if encoded else np.zeros(0, np.int64)
        self.target = np.concatenate([t for _, t in encoded]) if encoded else np.zeros(0, np.uint8)
        self.starts = np.cumsum([0] + [len(ids) for ids, _ in encoded])
        self.truncated = 0 if pack else int(np.sum(np.diff(self.starts) > seq_length + 1))

    def __len__(self) -> int:
        if self.pack:
            return max(0, (len(self.ids) - 1) // self.seq_length)
        return len(self.starts) - 1

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        width = self.seq_length + 1
        start = idx * self.seq_length if self.pack else int(self.starts[idx])
        end = start + width if self.pack else min(int(self.starts[idx + 1]), start + width)
        ids = np.full(width, self.pad_id, dtype=np.int64)
        target = np.zeros(width, dtype=np.float32)
        ids[: end - start], target[: end - start] = self.ids[start:end], self.target[start:end]
        ids = torch.from_numpy(ids)
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.from_numpy(target[1:])}


def build_chat_datasets(data_path: Sequence[str], split: str, seq_length: int, seed: int, tokenizer: Tokenizer,
                        pack: bool = True) -> Splits:
    """(train, valid, test) ChatDatasets from chat JSONL files; None for a split without conversations.

    Conversations are shuffled with ``seed`` and divided by the ``--split`` weights before packing, so
    no conversation is in two splits.
    """
    conversations = list(read_conversations(expand_inputs(list(data_path), "--data-path")))
    encoded = encode_conversations(tokenizer, conversations)
    order = np.random.RandomState(seed).permutation(len(encoded))
    bounds = np.round(np.cumsum([0.0] + parse_split(split)) * len(encoded)).astype(int)
    pad_id = tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod
    splits = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        dataset = ChatDataset([encoded[i] for i in order[begin:end]], seq_length, pad_id, pack)
        splits.append(dataset if len(dataset) else None)
    return tuple(splits)
