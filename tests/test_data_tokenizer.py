"""Tokenizer wrapper and tokenizer training (tools/train_tokenizer.py) on tiny corpora."""

import gzip
import json
import pickle
import random

import pytest
import sentencepiece as spm

from moc_megatron.data.tokenizer import CHAT_TOKENS, build_tokenizer
from moc_megatron.data.train_tokenizer import main as train_main
from moc_megatron.data.train_tokenizer import train_sentencepiece
from moc_megatron.errors import UserError

WORDS = ("the model reads memory chapters and every router picks a few of them while tokens flow through "
         "layers of attention with rotary positions so training stays stable on small machines").split()


def english(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tok") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": english(rng, rng.randint(5, 40))}) + "\n" for _ in range(300)))
    return path


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_model_has_requested_vocab_special_ids_and_single_chat_tokens(corpus, tmp_path, model_type):
    model = train_sentencepiece([str(corpus)], str(tmp_path / "m"), vocab_size=340, model_type=model_type)
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.get_piece_size() == 340
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    tok = build_tokenizer("SentencePieceTokenizer", model)
    assert (tok.vocab_size, tok.eod, tok.pad) == (340, 2, 3)
    for piece in CHAT_TOKENS:
        assert tok.tokenize(piece) == [sp.piece_to_id(piece)]
    assert len(set(tok.chat_tokens.values())) == 4
    assert (tmp_path / "m.vocab").read_text().splitlines()[2].startswith("</s>\t")


def test_trained_model_round_trips_any_text_with_byte_fallback(corpus, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer",
                          train_sentencepiece([str(corpus)], str(tmp_path / "m"), vocab_size=340))
    texts = ["The model reads  memory.\n\tIndented line\n", "prix: 12€ — 日本語", " leading space", ""]
    for text in texts:
        assert tok.detokenize(tok.tokenize(text)) == text
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    assert "<0xE2>" in sp.encode("€", out_type=str)  # unseen character -> UTF-8 bytes, not <unk>
    assert [list(x) for x in tok.tokenize_batch(texts[:2])] == [tok.tokenize(t) for t in texts[:2]]


def test_training_reads_text_and_gz_inputs_and_is_deterministic(corpus, tmp_path):
    lines = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    (tmp_path / "a.txt").write_text("\n".join(lines[:150]) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in lines[150:])
    args = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz")]
    first = train_sentencepiece(args, str(tmp_path / "x"), 350, json_key="body")
    model_bytes = open(first, "rb").read()
    second = train_sentencepiece(args, str(tmp_path / "y"), 350, json_key="body")
    assert open(second, "rb").read() == model_bytes


def test_train_tokenizer_cli_names_file_and_line_of_bad_json(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine line"}\n{"text": "also fine"}\n{"text": broken}\n')
    assert train_main(["--input", str(path), "--model-prefix", str(tmp_path / "m"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{path}:3:" in err and "Traceback" not in err
    assert not (tmp_path / "m.model").exists()


def test_train_tokenizer_cli_turns_an_impossible_vocab_into_a_user_error(corpus, tmp_path, capsys):
    assert train_main(["--input", str(corpus), "--model-prefix", str(tmp_path / "m"), "--vocab-size", "100000"]) == 2
    assert "--vocab-size" in capsys.readouterr().err


def test_null_tokenizer_follows_megatron_lm():
    tok = build_tokenizer("NullTokenizer", vocab_size=10)
    assert (tok.vocab_size, tok.eod) == (11, 10)
    assert tok.tokenize("3 1  4\t1") == [3, 1, 4, 1]
    assert tok.detokenize([3, 1, 4]) == "3 1 4"
    with pytest.raises(UserError, match="outside"):
        tok.tokenize("3 10")
    with pytest.raises(UserError, match="integer"):
        tok.tokenize("three")
    with pytest.raises(UserError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(UserError, match="chat token"):
        tok.chat_tokens


def test_huggingface_backend_uses_eos_as_eod_and_finds_chat_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "<pad>", *CHAT_TOKENS, "hello", "world"])}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(tmp_path)
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert (tok.vocab_size, tok.eod, tok.pad) == (len(vocab), 1, 2)
    assert tok.tokenize("hello world") == [vocab["hello"], vocab["world"]]
    assert tok.chat_tokens == {"system": 3, "user": 4, "assistant": 5, "end": 6}
    assert pickle.loads(pickle.dumps(tok)).tokenize("world hello") == [8, 7]


def test_tokenizer_pickles_by_how_it_was_built(corpus, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer",
                          train_sentencepiece([str(corpus)], str(tmp_path / "m"), vocab_size=340))
    text = "every router picks a few chapters"
    assert pickle.loads(pickle.dumps(tok)).tokenize(text) == tok.tokenize(text)


def test_build_tokenizer_names_the_missing_option(tmp_path):
    with pytest.raises(UserError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(UserError, match="no such file"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(UserError, match="--tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer", "x")
