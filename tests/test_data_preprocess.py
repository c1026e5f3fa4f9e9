"""tools/preprocess_data.py (moc-preprocess): round trip, invariance, bad input, atomic outputs, merge."""

import gzip
import json
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import sentencepiece as spm
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from moc_megatron.data import preprocess as pp
from moc_megatron.data.indexed import IndexedDatasetWriter
from moc_megatron.data.inputs import Segment, plan_segments, read_blocks
from moc_megatron.data.train_tokenizer import train_sentencepiece

pytestmark = pytest.mark.timeout(120)  # multi-process runs: fail, never hang

WORDS = ("data flows from jsonl lines into token ids and the writer stores them in one binary file with an "
         "index beside it so that training can read any document quickly").split()


def texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return str(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    return train_sentencepiece([write_jsonl(d / "c.jsonl", texts(0, 300))], str(d / "m"), vocab_size=300)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of ~1 KB so that small inputs still span many blocks, workers and partition cuts."""
    monkeypatch.setattr(pp, "BLOCK_BYTES", 1024)


def run(argv, capsys=None):
    code = pp.main([str(a) for a in argv])
    return code, (capsys.readouterr() if capsys else None)


def sp_args(model):
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]


def read_back(prefix):
    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def files_of(directory):
    return sorted(os.listdir(directory))


def test_documents_read_back_through_megatron_core_token_for_token(tmp_path, model, small_blocks):
    docs = texts(1, 200)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    assert run(["--input", src, "--output-prefix", tmp_path / "out", "--append-eod", *sp_args(model)])[0] == 0
    sp = spm.SentencePieceProcessor(model_file=model)
    assert read_back(tmp_path / "out_text_document") == [sp.encode(d) + [sp.eos_id()] for d in docs]
    assert IndexedDataset(str(tmp_path / "out_text_document")).index.dtype == np.uint16


def test_output_matches_megatron_lm_per_document_builder_bytes(tmp_path, model, small_blocks):
    docs = texts(2, 150)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    pp.main(["--input", src, "--output-prefix", str(tmp_path / "ours"), "--append-eod", "--workers", "2",
             *sp_args(model)])
    sp = spm.SentencePieceProcessor(model_file=model)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(sp.get_piece_size()))
    for d in docs:  # what Megatron-LM's tools/preprocess_data.py does per document
        ids = sp.encode_as_ids(d) + [sp.eos_id()]
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours_text_document{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_output_is_byte_identical_whatever_workers_and_partitions(tmp_path, model, small_blocks):
    inputs = [write_jsonl(tmp_path / f"in{i}.jsonl", texts(10 + i, 120)) for i in range(2)]
    outputs = []
    for workers, partitions in [(1, 1), (2, 1), (2, 3), (1, 5)]:
        prefix = tmp_path / f"w{workers}p{partitions}"
        assert run(["--input", *inputs, "--output-prefix", prefix, "--workers", workers,
                    "--partitions", partitions, *sp_args(model)])[0] == 0
        outputs.append([(tmp_path / f"{prefix.name}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")])
    assert all(o == outputs[0] for o in outputs[1:])
    assert not [f for f in files_of(tmp_path) if "tmp" in f]


def test_plan_segments_cover_every_line_once_and_cut_only_at_line_starts(tmp_path):
    rng = random.Random(3)
    paths, data = [], b""
    for i in range(3):
        content = "".join(f"line {rng.random()}\n" * rng.randint(0, 3) for _ in range(40)).encode()
        (tmp_path / f"f{i}.txt").write_bytes(content)
        paths.append(str(tmp_path / f"f{i}.txt"))
        data += content
    with gzip.open(tmp_path / "g.txt.gz", "wb") as f:
        f.write(b"zipped 1\nzipped 2\n")
    paths.append(str(tmp_path / "g.txt.gz"))
    data += b"zipped 1\nzipped 2\n"
    for parts in (1, 2, 3, 7, 50):
        plan = plan_segments(paths, parts)
        assert 1 <= len(plan) <= parts
        joined = b"".join(b for part in plan for seg in part for b in read_blocks(seg, 64))
        assert joined == data
        for seg in (s for part in plan for s in part):
            if seg.start:
                with open(seg.path, "rb") as f:
                    f.seek(seg.start - 1)
                    assert f.read(1) == b"\n"
    assert plan_segments([paths[0]], 1) == [[Segment(paths[0], 0, None)]]


@pytest.mark.parametrize("bad_line, reason", [
    ('{"text": "unterminated}', "not valid JSON"),
    ('{"title": "no text key"}', "no key 'text'"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    ('["a list"]', "not a JSON object"),
])
def test_bad_line_stops_the_run_naming_file_and_line(tmp_path, model, capsys, small_blocks, bad_line, reason):
    lines = [json.dumps({"text": t}).encode() for t in texts(4, 60)]
    lines[41] = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    code, out = run(["--input", src, "--output-prefix", tmp_path / "out", "--workers", 2, *sp_args(model)], capsys)
    assert code == 2
    assert out.err.startswith(f"error: {src}:42: {reason}") and "Traceback" not in out.err
    assert files_of(tmp_path) == ["in.jsonl"]


def test_first_bad_line_in_input_order_is_reported_with_partitions(tmp_path, model, capsys, small_blocks):
    lines = [json.dumps({"text": t}) for t in texts(5, 120)]
    lines[100], lines[7] = "not json", '{"other": 1}'
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    code, out = run(["--input", src, "--output-prefix", tmp_path / "out", "--workers", 2, "--partitions", 3,
                     *sp_args(model)], capsys)
    assert code == 2 and f"{src}:8: no key 'text'" in out.err
    assert files_of(tmp_path) == ["in.jsonl"]


def test_skip_bad_lines_counts_them_and_writes_what_a_clean_input_gives(tmp_path, model, capsys, small_blocks):
    good = texts(6, 80)
    lines = [json.dumps({"text": t}).encode() for t in good]
    for at, bad in [(3, b"{oops"), (30, b'{"txt": "x"}'), (61, b'{"text": "\xff"}')]:
        lines.insert(at, bad)
    (tmp_path / "dirty.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code, out = run(["--input", tmp_path / "dirty.jsonl", "--output-prefix", tmp_path / "dirty", "--skip-bad-lines",
                     "--workers", 2, *sp_args(model)], capsys)
    assert code == 0 and "skipped 3 bad lines" in out.out
    assert f"dirty.jsonl:4: not valid JSON" in out.out and "dirty.jsonl:62: not valid UTF-8" in out.out
    run(["--input", write_jsonl(tmp_path / "clean.jsonl", good), "--output-prefix", tmp_path / "clean",
         *sp_args(model)])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"dirty_text_document{ext}").read_bytes() == \
               (tmp_path / f"clean_text_document{ext}").read_bytes()


def test_empty_documents_are_skipped_and_counted(tmp_path, model, capsys):
    docs = ["data flows", "", "into token ids", "", ""]
    code, out = run(["--input", write_jsonl(tmp_path / "in.jsonl", docs), "--output-prefix", tmp_path / "o",
                     "--append-eod", *sp_args(model)], capsys)
    assert code == 0 and "2 documents" in out.out and "3 empty documents skipped" in out.out
    sp = spm.SentencePieceProcessor(model_file=model)
    assert read_back(tmp_path / "o_text_document") == [sp.encode(d) + [2] for d in ("data flows", "into token ids")]


def test_failed_run_keeps_the_previous_output_and_leaves_no_temporaries(tmp_path, model, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", texts(7, 30))
    run(["--input", src, "--output-prefix", tmp_path / "o", *sp_args(model)])
    before = {f: (tmp_path / f).read_bytes() for f in files_of(tmp_path)}
    with open(src, "a") as f:
        f.write("{broken\n")
    assert run(["--input", src, "--output-prefix", tmp_path / "o", *sp_args(model)], capsys)[0] == 2
    assert {f: (tmp_path / f).read_bytes() for f in files_of(tmp_path) if f != "in.jsonl"} == \
           {f: b for f, b in before.items() if f != "in.jsonl"}


@pytest.mark.parametrize("signum, expected", [(signal.SIGINT, 130), (signal.SIGTERM, SystemExit)])
def test_interrupted_run_leaves_nothing_that_looks_valid(tmp_path, model, small_blocks, signum, expected):
    """The input is a FIFO, so the run is surely mid-way (blocked reading) when the signal arrives."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    payload = "".join(json.dumps({"text": t}) + "\n" for t in texts(8, 300)).encode()
    assert len(payload) > 2 * pp.BLOCK_BYTES
    main_thread, seen_tmp = threading.get_ident(), []
    # a shell starting pytest in the background (`make test &`) leaves SIGINT ignored; Ctrl-C is the case here
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)

    def feed():
        with open(fifo, "wb") as f:
            f.write(payload)  # > 2 blocks: one is tokenised and written while the next read blocks
            f.flush()
            deadline = time.time() + 60
            while time.time() < deadline and not any(
                    x.endswith(".tmp") and os.path.getsize(tmp_path / x) for x in files_of(tmp_path)):
                time.sleep(0.05)
            seen_tmp.extend(x for x in files_of(tmp_path) if x.endswith(".tmp"))
            signal.pthread_kill(main_thread, signum)
            time.sleep(0.5)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        if expected is SystemExit:
            with pytest.raises(SystemExit):
                pp.main(["--input", str(fifo), "--output-prefix", str(tmp_path / "o"), *sp_args(model)])
        else:
            assert pp.main(["--input", str(fifo), "--output-prefix", str(tmp_path / "o"), *sp_args(model)]) == 130
    finally:
        feeder.join()
        signal.signal(signal.SIGINT, previous_int)
    assert seen_tmp, "the run never wrote its temporary output"
    assert files_of(tmp_path) == ["in.jsonl"]
    assert not IndexedDataset.exists(str(tmp_path / "o_text_document"))


def test_gz_input_gives_the_same_dataset_as_plain(tmp_path, model, small_blocks):
    docs = texts(9, 100)
    plain = write_jsonl(tmp_path / "a.jsonl", docs)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(open(plain).read())
    for name, src in (("plain", plain), ("gz", tmp_path / "b.jsonl.gz")):
        assert run(["--input", src, "--output-prefix", tmp_path / name, "--workers", 2, "--partitions", 2,
                    *sp_args(model)])[0] == 0
    assert read_back(tmp_path / "gz_text_document") == read_back(tmp_path / "plain_text_document")


def test_truncated_gz_input_is_a_user_error_naming_the_file(tmp_path, model, capsys):
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts(15, 400)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    code, out = run(["--input", tmp_path / "cut.jsonl.gz", "--output-prefix", tmp_path / "o", *sp_args(model)],
                    capsys)
    assert code == 2 and f"error: {tmp_path / 'cut.jsonl.gz'}: cannot read" in out.err
    assert files_of(tmp_path) == ["cut.jsonl.gz"]


def test_each_json_key_gets_its_own_dataset(tmp_path, model):
    titles, bodies = texts(10, 40), texts(11, 40)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"title": t, "body": b, "id": i}) + "\n"
                           for i, (t, b) in enumerate(zip(titles, bodies))))
    assert run(["--input", src, "--output-prefix", tmp_path / "o", "--json-keys", "title", "body",
                *sp_args(model)])[0] == 0
    sp = spm.SentencePieceProcessor(model_file=model)
    assert read_back(tmp_path / "o_title_document") == [sp.encode(t) for t in titles]
    assert read_back(tmp_path / "o_body_document") == [sp.encode(b) for b in bodies]


def test_text_files_hold_one_document_per_line_with_null_tokenizer(tmp_path):
    (tmp_path / "ids.txt").write_text("1 2 3\n4 5\r\n\n6\n")
    assert run(["--input", tmp_path / "*.txt", "--output-prefix", tmp_path / "o", "--tokenizer-type",
                "NullTokenizer", "--vocab-size", 10, "--append-eod"])[0] == 0
    assert read_back(tmp_path / "o_text_document") == [[1, 2, 3, 10], [4, 5, 10], [6, 10]]


def test_merge_joins_datasets_in_order_like_one_run(tmp_path, model, capsys):
    a, b = write_jsonl(tmp_path / "a.jsonl", texts(12, 50)), write_jsonl(tmp_path / "b.jsonl", texts(13, 70))
    for name, src in (("a", [a]), ("b", [b]), ("ab", [a, b])):
        run(["--input", *src, "--output-prefix", tmp_path / name, "--append-eod", *sp_args(model)])
    code, out = run(["--merge", "--input", tmp_path / "a_text_document", tmp_path / "b_text_document.idx",
                     "--output-prefix", tmp_path / "merged"], capsys)
    assert code == 0 and "120 documents" in out.out
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"ab_text_document{ext}").read_bytes()


def test_merge_rejects_datasets_with_different_token_types(tmp_path, capsys):
    for name, dtype in (("small", np.uint16), ("big", np.int32)):
        with IndexedDatasetWriter(str(tmp_path / name), dtype) as w:
            w.add_documents(np.arange(5), np.array([2, 3]))
            w.commit()
    code, out = run(["--merge", "--input", tmp_path / "small", tmp_path / "big", "--output-prefix",
                     tmp_path / "m"], capsys)
    assert code == 2 and "int32" in out.err and not (tmp_path / "m.idx").exists()


def test_writer_bytes_equal_megatron_core_builder(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=rng.integers(1, 40)) for _ in range(500)]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for d in docs:
        ref.add_document(torch.tensor(d), [len(d)])
    ref.finalize(str(tmp_path / "ref.idx"))
    with IndexedDatasetWriter(str(tmp_path / "ours"), np.int32) as w:
        for chunk in (docs[:123], docs[123:]):
            w.add_documents(np.concatenate(chunk), np.array([len(d) for d in chunk]))
        w.commit()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_progress_reports_documents_tokens_and_megabytes_per_second(tmp_path, model, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", texts(14, 50))
    code, out = run(["--input", src, "--output-prefix", tmp_path / "o", "--log-interval", 10, *sp_args(model)], capsys)
    assert code == 0
    assert "processed 50 documents (" in out.err and "docs/s" in out.err and "tokens/s" in out.err \
        and "MB/s" in out.err


@pytest.mark.parametrize("argv, message", [
    (["--input", "missing.jsonl", "--tokenizer-type", "NullTokenizer", "--vocab-size", "5"], "missing.jsonl: no such"),
    (["--input", "{src}", "--tokenizer-type", "NullTokenizer"], "--vocab-size"),
    (["--input", "{src}", "--tokenizer-type", "NullTokenizer", "--vocab-size", "5", "--workers", "0"], "--workers"),
    (["--input", "{src}"], "--tokenizer-type"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    src = write_jsonl(tmp_path / "in.jsonl", ["1 2"])
    code, out = run([a.format(src=src) for a in argv] + ["--output-prefix", tmp_path / "o"], capsys)
    assert code == 2 and out.err.startswith("error: ") and message in out.err and "Traceback" not in out.err
