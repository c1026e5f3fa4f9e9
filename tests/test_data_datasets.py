"""Datasets training reads: GPTDataset and blends through megatron-core, mock data, chat with its loss mask."""

import json
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
import sentencepiece as spm
import torch

from moc_megatron.data.chat import ChatDataset, build_chat_datasets, encode_conversations, read_conversations
from moc_megatron.data.preprocess import preprocess
from moc_megatron.data.pretraining import MockDataset, build_mock_datasets, build_pretraining_datasets, \
    parse_data_path
from moc_megatron.data.tokenizer import build_tokenizer
from moc_megatron.data.train_tokenizer import train_sentencepiece
from moc_megatron.errors import UserError

pytestmark = pytest.mark.timeout(120)

SPAN = 25  # document j holds ids SPAN*j, SPAN*j + 1, ...: every id names its document


def counting_documents(path, first_doc, n_docs, seed):
    """Null-tokenizer documents whose ids count up by one: any sample can be checked without the reader."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for j in range(first_doc, first_doc + n_docs):
            f.write(" ".join(str(SPAN * j + k) for k in range(rng.randint(3, SPAN - 1))) + "\n")


@pytest.fixture(scope="module")
def null_tok():
    return build_tokenizer("NullTokenizer", vocab_size=2000)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, null_tok):
    """Two indexed datasets: A holds documents 0-39, B documents 40-79."""
    d = tmp_path_factory.mktemp("gpt")
    prefixes = []
    for name, first in (("a", 0), ("b", 40)):
        counting_documents(d / f"{name}.txt", first, 40, seed=first)
        preprocess([str(d / f"{name}.txt")], str(d / name), null_tok, append_eod=True, log_interval=0)
        prefixes.append(str(d / f"{name}_text_document"))
    return d, prefixes


def check_sample(sample, seq_length, eod):
    """Shapes, the shift by one, and that each next token continues its document or follows an eod."""
    tokens, labels, mask = sample["tokens"], sample["labels"], sample["loss_mask"]
    assert tokens.shape == labels.shape == mask.shape == (seq_length,)
    assert tokens.dtype == labels.dtype == torch.int64 and mask.dtype == torch.float32
    assert torch.equal(tokens[1:], labels[:-1])
    for t, nxt in zip(tokens.tolist(), labels.tolist()):
        assert nxt == t + 1 or nxt == eod or t == eod, (t, nxt)
        if t == eod:
            assert nxt % SPAN == 0  # a document starts after an eod
    return {t // SPAN for t in tokens.tolist() + labels.tolist() if t != eod}


def test_gpt_dataset_samples_are_windows_of_the_split_documents(corpora, null_tok, tmp_path):
    _, (a, _) = corpora
    train, valid, test = build_pretraining_datasets([a], "8,2,0", 16, (60, 8, 0), seed=7, tokenizer=null_tok,
                                                    cache_dir=str(tmp_path / "cache"))
    assert test is None and len(train) >= 60 and len(valid) >= 8
    train_docs = set().union(*(check_sample(train[i], 16, null_tok.eod) for i in range(len(train))))
    valid_docs = set().union(*(check_sample(valid[i], 16, null_tok.eod) for i in range(len(valid))))
    assert train_docs <= set(range(32)) and valid_docs <= set(range(32, 40))  # document split 80/20
    assert len(train_docs) == 32
    again, _, _ = build_pretraining_datasets([a], "8,2,0", 16, (60, 8, 0), seed=7, tokenizer=null_tok,
                                             cache_dir=str(tmp_path / "cache"))
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(len(train)))
    assert len(list((tmp_path / "cache").glob("*GPTDataset-train-shuffle_index.npy"))) == 1


def test_blend_draws_from_each_dataset_by_weight(corpora, null_tok, tmp_path):
    _, (a, b) = corpora
    train, valid, test = build_pretraining_datasets([f"0.2 {a}", "0.8", b], "1", 8, (500, 0, 0), seed=3,
                                                    tokenizer=null_tok, cache_dir=str(tmp_path / "cache"))
    assert valid is None and test is None and len(train) >= 500
    sources = Counter()
    for i in range(len(train)):
        docs = check_sample(train[i], 8, null_tok.eod)
        assert docs <= set(range(40)) or docs <= set(range(40, 80))  # a sample comes from one dataset
        sources["a" if max(docs) < 40 else "b"] += 1
    assert abs(sources["a"] / len(train) - 0.2) < 0.02


def test_unweighted_prefixes_are_blended_by_size(corpora, null_tok, tmp_path):
    _, (a, b) = corpora
    train, _, _ = build_pretraining_datasets([a, b], "1", 8, (100, 0, 0), seed=3, tokenizer=null_tok,
                                             cache_dir=str(tmp_path / "cache"))
    docs = set().union(*(check_sample(train[i], 8, null_tok.eod) for i in range(len(train))))
    assert docs & set(range(40)) and docs & set(range(40, 80))


def _first_samples(rank, world_size, data_path, cache_dir):
    tok = build_tokenizer("NullTokenizer", vocab_size=2000)
    train, _, _ = build_pretraining_datasets(data_path, "1", 8, (50, 0, 0), seed=3, tokenizer=tok,
                                             cache_dir=cache_dir)
    return [train[i]["tokens"] for i in range(len(train))]


@pytest.mark.slow
def test_every_rank_builds_the_same_blend_from_one_cache(corpora, tmp_path):
    from multiproc import run_ranks

    _, (a, b) = corpora
    data_path = ["0.5", a, "0.5", b]
    ranks = run_ranks(_first_samples, 2, args=(data_path, str(tmp_path / "cache")))
    assert len(ranks[0]) >= 50 and all(torch.equal(x, y) for x, y in zip(*ranks))
    assert list((tmp_path / "cache").glob("*BlendedDataset-train-dataset_index.npy"))
    single = _first_samples(0, 1, data_path, str(tmp_path / "cache"))
    assert all(torch.equal(x, y) for x, y in zip(single, ranks[0]))


@pytest.mark.parametrize("data_path, message", [
    (["0.5"], "only prefixes or weight-prefix pairs"),
    (["{a} 0.5"], "only prefixes or weight-prefix pairs"),
    (["-1 {a} 2 {b}"], "weights must be >= 0"),
    (["{a}_missing"], "not found"),
    ([], "--data-path is empty"),
])
def test_bad_data_path_is_a_user_error(corpora, data_path, message):
    _, (a, b) = corpora
    with pytest.raises(UserError, match=message):
        parse_data_path([p.format(a=a, b=b) for p in data_path])


@pytest.mark.parametrize("split", ["a,b", "1,2,3,4", "0,0,0", "-1,2"])
def test_bad_split_is_a_user_error(corpora, null_tok, split):
    _, (a, _) = corpora
    with pytest.raises(UserError, match="--split"):
        build_pretraining_datasets([a], split, 8, (10, 0, 0), 1, null_tok)


def test_mock_data_is_deterministic_and_has_structure_to_learn():
    train, valid, test = build_mock_datasets(64, (300, 50, 0), seed=5, vocab_size=1000)
    assert test is None and len(train) == 300
    first = train[17]
    assert torch.equal(first["tokens"], MockDataset(300, 64, 1000, seed=5)[17]["tokens"])
    assert not torch.equal(first["tokens"], MockDataset(300, 64, 1000, seed=6)[17]["tokens"])
    assert not torch.equal(first["tokens"], valid[17]["tokens"])
    assert torch.equal(first["tokens"][1:], first["labels"][:-1]) and first["loss_mask"].sum() == 64
    following = defaultdict(Counter)  # a bigram model fitted on train predicts valid far above chance
    for i in range(len(train)):
        for t, nxt in zip(train[i]["tokens"].tolist(), train[i]["labels"].tolist()):
            following[t][nxt] += 1
    hits = total = 0
    for i in range(len(valid)):
        for t, nxt in zip(valid[i]["tokens"].tolist(), valid[i]["labels"].tolist()):
            hits += bool(following[t]) and following[t].most_common(1)[0][0] == nxt
            total += 1
    assert hits / total > 0.8  # 7 of every 8 next tokens are determined


# ---------------------------------------------------------------- chat

CHAT_WORDS = "what does the router do it picks chapters of memory for each sequence explain how".split()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    rng = random.Random(1)
    (d / "c.txt").write_text("\n".join(" ".join(rng.choice(CHAT_WORDS) for _ in range(12)) for _ in range(200)))
    return train_sentencepiece([str(d / "c.txt")], str(d / "m"), vocab_size=300)


def write_chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return str(path)


def test_chat_loss_mask_covers_assistant_tokens_and_their_end_token_only(chat_model, tmp_path):
    tok, sp = build_tokenizer("SentencePieceTokenizer", chat_model), spm.SentencePieceProcessor(model_file=chat_model)
    messages = [{"role": "system", "content": "explain how"}, {"role": "user", "content": "what does the router do"},
                {"role": "assistant", "content": "it picks chapters"}, {"role": "user", "content": "of memory"},
                {"role": "assistant", "content": "for each sequence"}]
    path = write_chats(tmp_path / "c.jsonl", [messages])
    (encoded,) = encode_conversations(tok, list(read_conversations([path])))
    dataset = ChatDataset([encoded], seq_length=256, pad_id=tok.pad, pack=False)
    assert dataset.truncated == 0
    sample = dataset[0]
    tokens, labels, mask = sample["tokens"].tolist(), sample["labels"].tolist(), sample["loss_mask"]
    n = len(encoded[0])
    template = ("<|system|>explain how<|end|><|user|>what does the router do<|end|>"
                "<|assistant|>it picks chapters<|end|><|user|>of memory<|end|><|assistant|>for each sequence<|end|>")
    assert sp.decode(tokens[: n - 1]) == template and labels[n - 2] == sp.eos_id()
    assert sp.decode([l for l, m in zip(labels, mask.tolist()) if m]) == \
        "it picks chapters<|end|>for each sequence<|end|>"
    assert mask.sum() == len(sp.encode("it picks chapters")) + len(sp.encode("for each sequence")) + 2
    assert mask[n - 1:].sum() == 0 and set(tokens[n:]) == {tok.pad}  # padding carries no loss
    assert labels[mask.nonzero()[0].item() - 1] == sp.piece_to_id("<|assistant|>")


def test_packed_chat_samples_are_consecutive_windows_with_aligned_masks(chat_model, tmp_path):
    tok, sp = build_tokenizer("SentencePieceTokenizer", chat_model), spm.SentencePieceProcessor(model_file=chat_model)
    rng = random.Random(2)
    conversations = [[{"role": "user", "content": " ".join(rng.choice(CHAT_WORDS) for _ in range(5))},
                      {"role": "assistant", "content": f"{i} " + " ".join(rng.choice(CHAT_WORDS) for _ in range(4))}]
                     for i in range(30)]
    encoded = encode_conversations(tok, conversations)
    dataset = ChatDataset(encoded, seq_length=16, pad_id=tok.pad, pack=True)
    stream = np.concatenate([ids for ids, _ in encoded])
    assert len(dataset) == (len(stream) - 1) // 16
    masked = []
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["tokens"].tolist() == stream[16 * i:16 * i + 16].tolist()
        masked += [l for l, m in zip(sample["labels"].tolist(), sample["loss_mask"].tolist()) if m]
    answers = "".join(c[1]["content"] + "<|end|>" for c in conversations)
    assert len(masked) > 100 and answers.startswith(sp.decode(masked))


@pytest.mark.parametrize("line, message", [
    (b'{"messages": [', "not valid JSON"),
    (b'{"msgs": []}', 'expected {"messages"'),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}', "message 0: role must be"),
    (b'{"messages": [{"role": "assistant", "content": 3}]}', "message 0: content must be a string"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    (b'{"messages": [{"role": "assistant", "content": "\xff"}]}', "not valid UTF-8"),
])
def test_bad_chat_line_names_file_and_line(chat_model, tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "chat.jsonl"
    path.write_bytes(good.encode() + b"\n\n" + line + b"\n")
    with pytest.raises(UserError, match=f"{path}:3: {message}".replace("[", r"\[").replace("{", r"\{")):
        build_chat_datasets([str(path)], "1", 32, 0, build_tokenizer("SentencePieceTokenizer", chat_model))


def test_chat_splits_never_share_a_conversation(chat_model, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer", chat_model)
    sp = spm.SentencePieceProcessor(model_file=chat_model)
    path = write_chats(tmp_path / "c.jsonl", [[{"role": "user", "content": "what"},
                                               {"role": "assistant", "content": f"{i}"}] for i in range(40)])
    train, valid, test = build_chat_datasets([path], "3,1,0", 16, seed=4, tokenizer=tok, pack=False)
    assert train.truncated == valid.truncated == 0
    assert test is None and (len(train), len(valid)) == (30, 10)

    def answers(ds):
        return {sp.decode([l for l, m in zip(s["labels"].tolist(), s["loss_mask"].tolist()) if m])
                for s in (ds[i] for i in range(len(ds)))}

    assert answers(train).isdisjoint(answers(valid))
    assert answers(train) | answers(valid) == {f"{i}<|end|>" for i in range(40)}
