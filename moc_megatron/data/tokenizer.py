"""One tokenizer interface for preprocessing, datasets, chat and export.

Three backends behind the same attributes (``vocab_size``, ``eod``, ``pad``, ``bos``, ``eos``) and
methods (``tokenize``, ``tokenize_batch``, ``detokenize``, ``chat_token``):

- ``SentencePieceTokenizer``: a sentencepiece ``.model`` (ids as Megatron-LM's GPTSentencePieceTokenizer:
  no BOS/EOS added, end of document = ``</s>``).
- ``HuggingFaceTokenizer``: a local ``transformers`` tokenizer directory (no special tokens added;
  end of document = its EOS token).
- ``NullTokenizer``: text is space-separated integer ids, as Megatron-LM's NullTokenizer; for tests
  and pre-tokenised data.

``pad`` is -1 where the tokenizer has no padding token (megatron-core's convention). The chat
template's special tokens (``CHAT_TOKENS``) are single pieces of models trained by
tools/train_tokenizer.py; ``chat_token`` says clearly when a model lacks them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from functools import cached_property
from typing import Optional, Sequence

from moc_megatron.errors import UserError

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


class Tokenizer(ABC):
    """What moc-megatron needs from a tokenizer. Picklable: it is rebuilt from how it was built."""

    vocab_size: int
    eod: int
    pad: int = -1
    bos: Optional[int] = None
    eos: Optional[int] = None

    def __init__(self, *spec) -> None:
        self._spec = spec
        # megatron-core hashes this into the names of its cached sample indices.
        self.unique_identifiers = {"class": type(self).__name__, "spec": [str(s) for s in spec]}

    def __reduce__(self):
        return (type(self), self._spec)

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        """Ids of many texts (lists or numpy arrays); backends override this with a faster batched call."""
        return [self.tokenize(t) for t in texts]

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @abstractmethod
    def _lookup(self, piece: str) -> Optional[int]:
        """The id of ``piece`` if it is one token of the vocabulary, else None."""

    def chat_token(self, piece: str) -> int:
        """The id of a chat special token (``CHAT_TOKENS``); a UserError if the model lacks it."""
        token_id = self._lookup(piece)
        if token_id is None:
            raise UserError(
                f"tokenizer {self._spec[0]} has no chat token {piece!r}; train one with "
                f"tools/train_tokenizer.py (it adds {', '.join(CHAT_TOKENS)}) or add them to the model")
        return token_id

    @cached_property
    def chat_tokens(self) -> dict[str, int]:
        """Role and end-of-turn token ids: ``{"system": id, "user": id, "assistant": id, "end": id}``."""
        ids = {role: self.chat_token(piece) for role, piece in ROLE_TOKENS.items()}
        ids["end"] = self.chat_token(END_OF_TURN)
        return ids


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file."""

    def __init__(self, model_path: str) -> None:
        super().__init__(model_path)
        import sentencepiece

        if not os.path.isfile(model_path):
            raise UserError(f"--tokenizer-model {model_path}: no such file")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise UserError(f"--tokenizer-model {model_path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos = _or_none(self._sp.bos_id())
        self.eos = _or_none(self._sp.eos_id())
        self.pad = self._sp.pad_id()
        if self.eos is None:
            raise UserError(f"--tokenizer-model {model_path}: the model has no </s> (eos) piece, "
                            "which marks the end of each document")
        self.eod = self.eos

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        # One C++ call per batch returning numpy arrays (building Python ints costs a third of the time);
        # one thread because preprocessing already runs a process per core.
        return self._sp.encode(list(texts), num_threads=1, return_type="numpy")

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _lookup(self, piece: str) -> Optional[int]:
        token_id = self._sp.piece_to_id(piece)
        return token_id if self._sp.id_to_piece(token_id) == piece else None


class HuggingFaceTokenizer(Tokenizer):
    """A ``transformers`` tokenizer (a local directory with tokenizer files)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"--tokenizer-model {path}: cannot load a Hugging Face tokenizer ({e})") from None
        self.vocab_size = len(self._tok)
        self.bos = self._tok.bos_token_id
        self.eos = self._tok.eos_token_id
        self.pad = -1 if self._tok.pad_token_id is None else self._tok.pad_token_id
        if self.eos is None:
            raise UserError(f"--tokenizer-model {path}: the tokenizer has no eos token, "
                            "which marks the end of each document")
        self.eod = self.eos

    def tokenize(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def tokenize_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def _lookup(self, piece: str) -> Optional[int]:
        return self._tok.get_vocab().get(piece)


class NullTokenizer(Tokenizer):
    """Text is space-separated ids below ``vocab_size``; ``eod`` is ``vocab_size`` (Megatron-LM's rule)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(int(vocab_size))
        self._text_ids = int(vocab_size)
        self.vocab_size = self._text_ids + 1
        self.eod = self.eos = self._text_ids

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise UserError("NullTokenizer expects space-separated integer ids") from None
        if any(not 0 <= i < self._text_ids for i in ids):
            raise UserError(f"NullTokenizer: an id is outside [0, {self._text_ids}) (--vocab-size)")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def _lookup(self, piece: str) -> Optional[int]:
        return None


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> Tokenizer:
    """The tokenizer named by ``--tokenizer-type`` / ``--tokenizer-model`` (/ ``--vocab-size`` for Null)."""
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise UserError("--tokenizer-type NullTokenizer needs --vocab-size (the number of text ids)")
        return NullTokenizer(vocab_size)
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type {tokenizer_type}: expected one of {', '.join(TOKENIZER_TYPES)}")
    if not tokenizer_model:
        raise UserError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    return HuggingFaceTokenizer(tokenizer_model)


def _or_none(token_id: int) -> Optional[int]:
    return None if token_id < 0 else token_id
