"""Preprocessing throughput: moc-megatron's preprocessor against Megatron-LM's algorithm.

Input: the embedded pydoc corpus (tools/make_corpus.py) repeated to at least ``--min-mb`` MB of JSONL;
tokenizer: a sentencepiece BPE model trained on that corpus. Each run is a fresh process, timed from
the start of the work (after imports) to the finished .bin/.idx; its peak memory is reported too.

"megatron-lm baseline" is NOT Megatron-LM's file (only megatron-core is installed): it re-implements
the algorithm of Megatron-LM's tools/preprocess_data.py for one partition and no sentence splitting:
``multiprocessing.Pool(workers).imap(encoder.encode, file, 32)``, where ``encode`` does ``json.loads``
and one ``encode_as_ids`` per document (+ eod), and the main process calls
``IndexedDatasetBuilder.add_document`` per document, then ``finalize``. Both write the same bytes,
which this benchmark checks.

    python benchmarks/bench_preprocess.py [--json results.json] [--min-mb 50] [--workers 1 2] [--repeat 1]

On a shared machine wall times vary between runs; ``--repeat`` keeps the fastest of several
interleaved runs, and the CPU seconds (all processes) show the work done independently of load.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import moc_megatron  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMPLEMENTATIONS = ("moc-megatron", "megatron-lm baseline")


# ---------------------------------------------------------------- the baseline (Megatron-LM's algorithm)


class MegatronLMEncoder:
    """Megatron-LM's ``Encoder`` (tools/preprocess_data.py) with its GPTSentencePieceTokenizer."""

    tokenizer = None

    def __init__(self, model: str, keys: list[str], append_eod: bool) -> None:
        self.model, self.keys, self.append_eod = model, keys, append_eod

    def initializer(self) -> None:
        import sentencepiece

        MegatronLMEncoder.tokenizer = sentencepiece.SentencePieceProcessor(model_file=self.model)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in self.keys:
            text = data[key]
            sentences = text if isinstance(text, list) else [text]
            doc_ids, sentence_lens = [], []
            for sentence in sentences:
                sentence_ids = MegatronLMEncoder.tokenizer.encode_as_ids(sentence)
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0 and self.append_eod:
                doc_ids.append(MegatronLMEncoder.tokenizer.eos_id())
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


def run_megatron_lm_baseline(input_path: str, output_prefix: str, model: str, workers: int) -> int:
    """Megatron-LM's ``Partition.process_json_file`` for key 'text'; returns the token count."""
    import sentencepiece
    from megatron.core.datasets import indexed_dataset

    encoder = MegatronLMEncoder(model, ["text"], append_eod=True)
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=model).get_piece_size()
    tokens = 0
    with open(input_path, "r", encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        encoded_docs = pool.imap(encoder.encode, fin, 32)
        builder = indexed_dataset.IndexedDatasetBuilder(
            f"{output_prefix}_text_document.bin", dtype=indexed_dataset.DType.optimal_dtype(vocab_size))
        for doc, sentence_lens, _ in encoded_docs:
            for key in doc.keys():
                builder.add_document(doc[key], sentence_lens[key])
                tokens += len(doc[key])
        pool.close()
        pool.join()
    builder.finalize(f"{output_prefix}_text_document.idx")
    return tokens


def run_ours(input_path: str, output_prefix: str, model: str, workers: int) -> int:
    from moc_megatron.data.preprocess import preprocess
    from moc_megatron.data.tokenizer import build_tokenizer

    stats = preprocess([input_path], output_prefix, build_tokenizer("SentencePieceTokenizer", model),
                       append_eod=True, workers=workers, log_interval=0)
    return stats.tokens["text"]


# ---------------------------------------------------------------- one timed run, in its own process


def run_one(implementation: str, input_path: str, output_prefix: str, model: str, workers: int) -> dict:
    import megatron.core.datasets.indexed_dataset  # noqa: F401 - imports are not part of the timing
    import moc_megatron.data.preprocess  # noqa: F401

    run = run_ours if implementation == "moc-megatron" else run_megatron_lm_baseline
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    tokens = run(input_path, output_prefix, model, workers)
    seconds = time.perf_counter() - start
    size = os.path.getsize(input_path)
    return {"implementation": implementation, "workers": workers, "seconds": round(seconds, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds), "mb_per_s": round(size / seconds / 1e6, 3),
            "cpu_seconds": round(_cpu_seconds() - cpu_before, 2),
            "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---------------------------------------------------------------- setup and report


def prepare(work: str, min_mb: float, vocab_size: int) -> tuple[str, str]:
    """The repeated corpus and a tokenizer trained on one copy of it."""
    from moc_megatron.data.corpus import make_corpus
    from moc_megatron.data.train_tokenizer import train_sentencepiece

    corpus, _ = make_corpus(work)
    model = train_sentencepiece([corpus], os.path.join(work, "bench_tok"), vocab_size)
    data = Path(corpus).read_bytes()
    big = os.path.join(work, "bench_corpus.jsonl")
    with open(big, "wb") as f:
        for _ in range(max(1, -(-int(min_mb * 1e6) // len(data)))):
            f.write(data)
    return big, model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="Write the results here.")
    p.add_argument("--min-mb", type=float, default=50.0, help="Size of the benchmark corpus in MB (at least).")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to measure.")
    p.add_argument("--vocab-size", type=int, default=16000, help="Vocabulary of the trained tokenizer.")
    p.add_argument("--repeat", type=int, default=1,
                   help="Runs per configuration, implementations interleaved; the fastest is reported.")
    p.add_argument("--one", nargs=5, metavar=("IMPL", "INPUT", "PREFIX", "MODEL", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        impl, input_path, prefix, model, workers = args.one
        print(json.dumps(run_one(impl, input_path, prefix, model, int(workers))))
        return 0

    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        corpus, model = prepare(work, args.min_mb, args.vocab_size)
        size_mb = os.path.getsize(corpus) / 1e6
        print(f"corpus {size_mb:.1f} MB, sentencepiece BPE vocab {args.vocab_size}, {os.cpu_count()} CPUs")
        rows = []
        for workers in args.workers:
            prefixes = {impl: os.path.join(work, f"{impl.split()[0]}_w{workers}") for impl in IMPLEMENTATIONS}
            best: dict = {}
            for _ in range(args.repeat):
                for impl in IMPLEMENTATIONS:
                    out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--one", impl, corpus,
                                          prefixes[impl], model, str(workers)],
                                         check=True, capture_output=True, text=True).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    if impl not in best or row["seconds"] < best[impl]["seconds"]:
                        best[impl] = row
            same = all(filecmp.cmp(f"{prefixes[IMPLEMENTATIONS[0]]}_text_document{ext}",
                                   f"{prefixes[IMPLEMENTATIONS[1]]}_text_document{ext}", shallow=False)
                       for ext in (".bin", ".idx"))
            for impl in IMPLEMENTATIONS:
                rows.append({**best[impl], "identical_output": same})
        print_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"corpus_mb": round(size_mb, 2), "vocab_size": args.vocab_size, "cpus": os.cpu_count(),
                       "repeat": args.repeat, "runs": rows}, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(rows: list[dict]) -> None:
    header = (f"{'implementation':<22}{'workers':>8}{'seconds':>10}{'tokens/s':>12}{'MB/s':>8}{'CPU s':>8}"
              f"{'RSS MB':>8}  same bytes")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['implementation']:<22}{r['workers']:>8}{r['seconds']:>10.2f}{r['tokens_per_s']:>12,}"
              f"{r['mb_per_s']:>8.2f}{r['cpu_seconds']:>8.1f}{r['peak_rss_main_mb']:>8.0f}  {r['identical_output']}")


if __name__ == "__main__":
    sys.exit(main())
