"""Train a sentencepiece tokenizer from JSONL or text (tools/train_tokenizer.py).

The input is streamed to sentencepiece line by line, and sentencepiece keeps a uniform sample of at
most ``--input-sentence-size`` lines, so a corpus larger than memory works. The model is lossless
(identity normalisation, no dummy prefix, whitespace kept, byte fallback for unseen characters), so
``detokenize(tokenize(text)) == text``; ids 0-3 are <unk>, <s>, </s> (end of document), <pad>; the
chat template's tokens (tokenizer.CHAT_TOKENS) and any ``--special-tokens`` are single pieces.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterator, Optional

from moc_megatron.data.inputs import decode_line, expand_inputs, input_format, iter_lines
from moc_megatron.data.tokenizer import CHAT_TOKENS
from moc_megatron.errors import UserError


def iter_training_lines(paths: list[str], json_key: str = "text") -> Iterator[str]:
    """Every non-blank line of every document: sentencepiece learns from lines."""
    for path in paths:
        fmt = input_format(path)
        for number, raw in iter_lines(path):
            text = decode_line(path, number, raw)
            if fmt == "json":
                if not text.strip():
                    continue
                text = _json_value(path, number, text, json_key)
            for line in text.split("\n"):
                if line.strip():
                    yield line


def _json_value(path: str, number: int, text: str, key: str) -> str:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
        raise UserError(f"{path}:{number}: no string under key {key!r} (--json-key)")
    return obj[key]


def train_sentencepiece(inputs: list[str], model_prefix: str, vocab_size: int, model_type: str = "bpe",
                        json_key: str = "text", input_sentence_size: int = 2_000_000,
                        special_tokens: tuple[str, ...] = (), seed: int = 1234) -> str:
    """Train and write ``{model_prefix}.model`` and ``.vocab``; returns the model path."""
    import sentencepiece as spm

    paths = expand_inputs(inputs)
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"--model-type {model_type}: expected bpe or unigram")
    symbols = list(dict.fromkeys((*CHAT_TOKENS, *special_tokens)))
    if any("," in s or not s.strip() for s in symbols):
        raise UserError("--special-tokens: a token may not be blank or contain a comma")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_with_progress(iter_training_lines(paths, json_key)), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=symbols,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 14,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=1)
    except RuntimeError as e:
        raise UserError(f"sentencepiece could not train ({str(e).strip()}); for a small corpus "
                        "lower --vocab-size") from None
    path = f"{model_prefix}.model"
    _write_atomic(path, model.getvalue())
    _write_atomic(f"{model_prefix}.vocab", _vocab_text(path).encode("utf-8"))
    return path


def _with_progress(lines: Iterator[str]) -> Iterator[str]:
    """Count lines on a tqdm bar while sentencepiece reads them."""
    from tqdm import tqdm

    with tqdm(desc="reading lines", unit=" lines", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        for line in lines:
            bar.update()
            yield line


def _vocab_text(model_path: str) -> str:
    """sentencepiece's .vocab format: piece, tab, score, one a line."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


def _write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"--model-prefix: directory {directory} does not exist")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="Files or globs: .jsonl, .json, .txt, optionally .gz.")
    p.add_argument("--json-key", default="text", help="Key holding the text in JSON lines.")
    p.add_argument("--model-prefix", required=True, help="Writes {prefix}.model and {prefix}.vocab.")
    p.add_argument("--vocab-size", type=int, required=True, help="Pieces in the vocabulary, special ones included.")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece algorithm.")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="Train on a uniform sample of at most this many lines (0: all).")
    p.add_argument("--special-tokens", nargs="*", default=[],
                   help="Extra single-piece tokens, besides the chat template's.")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the line sample.")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        path = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type,
                                   args.json_key, args.input_sentence_size, tuple(args.special_tokens), args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {args.model_prefix}.vocab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
