"""Tokenise JSONL or text into Megatron indexed datasets (``moc-preprocess``, tools/preprocess_data.py).

Megatron-LM's flags and names: every ``--json-keys`` key becomes ``{prefix}_{key}_document.bin/.idx``,
one sequence per document, written through megatron-core's builder (see indexed.py), so Megatron-LM
and megatron-core read the result. Differences from Megatron-LM's tool: empty documents (no tokens)
are skipped and counted per key instead of written with length zero; bad lines stop the run naming
file and line (or are counted with ``--skip-bad-lines``); outputs appear only when complete; .txt
inputs (a document per line) and .gz are read too; no sentence splitting.

How the work is split, and why the output never depends on it: the input is read in blocks of whole
lines, ``--workers`` processes parse and tokenise them (encode.py), and the results are written in
input order. ``--partitions P`` cuts the input into P contiguous byte ranges that run at once (each
with its own reader, writer and ``workers // P`` tokenisers) and joins their shards in order; this
only helps when one reader/writer cannot keep up with many workers.
"""

from __future__ import annotations

import argparse
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

from moc_megatron.data.encode import EncoderPool, Options, mp_context
from moc_megatron.data.indexed import IndexedDatasetWriter, merge_datasets, resolve_prefixes, token_dtype
from moc_megatron.data.inputs import Segment, expand_inputs, input_format, line_number, plan_segments, \
    read_blocks
from moc_megatron.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer
from moc_megatron.errors import UserError

# A block and its encoded result fit a pipe's kernel buffer, so neither side waits for the other to be
# scheduled to finish a transfer; still big enough that per-block overhead is negligible.
BLOCK_BYTES = 1 << 17
BAD_EXAMPLES = 5


@dataclass
class Stats:
    """Counts of one run (or partition), per output key where it makes sense."""

    documents: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    empty: dict = field(default_factory=dict)
    bad_lines: int = 0
    bad_examples: list = field(default_factory=list)
    bytes: int = 0

    def add(self, other: "Stats") -> None:
        for mine, theirs in ((self.documents, other.documents), (self.tokens, other.tokens),
                             (self.empty, other.empty)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.bad_lines += other.bad_lines
        self.bad_examples = (self.bad_examples + other.bad_examples)[:BAD_EXAMPLES]
        self.bytes += other.bytes


# ---------------------------------------------------------------- one partition: read, encode, write


def _blocks(segments: list[Segment]) -> Iterator[tuple]:
    """(segment index, lines before the block in its segment, format, block) in input order."""
    for index, segment in enumerate(segments):
        fmt, lines = input_format(segment.path), 0
        for block in read_blocks(segment, BLOCK_BYTES):
            yield index, lines, fmt, block
            lines += block.count(b"\n") + (not block.endswith(b"\n"))


def run_partition(segments: list[Segment], options: Options, prefixes: dict,
                  progress: Callable[[int, int, int], None],
                  before_commit: Callable[[Stats], None] = lambda stats: None) -> Stats:
    """Tokenise ``segments`` in order into one dataset per key at ``prefixes[key]``."""
    stats = Stats(documents={k: 0 for k in options.keys}, tokens={k: 0 for k in options.keys},
                  empty={k: 0 for k in options.keys})
    first_lines: dict = {}
    with ExitStack() as stack:
        writers = {k: stack.enter_context(IndexedDatasetWriter(prefixes[k], options.dtype))
                   for k in options.keys}
        pool = stack.enter_context(EncoderPool(options))
        for index, line_offset, nbytes, packed, bad in pool.map(_blocks(segments)):
            if bad:
                segment = segments[index]
                if segment not in first_lines:
                    first_lines[segment] = line_number(segment.path, segment.start)
                where = [f"{segment.path}:{first_lines[segment] + line_offset + i}: {why}" for i, why in bad]
                if not options.skip_bad_lines:
                    raise UserError(f"{where[0]} (--skip-bad-lines skips such lines)")
                stats.bad_lines += len(bad)
                stats.bad_examples = (stats.bad_examples + where)[:BAD_EXAMPLES]
            docs = tokens = 0
            for key, (key_tokens, lengths, empty) in packed.items():
                writers[key].add_documents(key_tokens, lengths)
                stats.documents[key] += len(lengths)
                stats.tokens[key] += len(key_tokens)
                stats.empty[key] += empty
                docs, tokens = max(docs, len(lengths)), tokens + len(key_tokens)
            stats.bytes += nbytes
            progress(docs, tokens, nbytes)
        before_commit(stats)
        for writer in writers.values():
            writer.commit()
    return stats


# ---------------------------------------------------------------- several partitions at once


def _partition_main(part: int, segments: list, options: Options, prefixes: dict, counters, conn) -> None:
    """Entry point of a partition process: run it, send the outcome on ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)

    def progress(docs: int, tokens: int, nbytes: int) -> None:
        counters[3 * part] += docs
        counters[3 * part + 1] += tokens
        counters[3 * part + 2] += nbytes

    try:
        conn.send(("ok", run_partition(segments, options, prefixes, progress)))
    except UserError as e:
        conn.send(("error", str(e)))
    except Exception:  # noqa: BLE001 - a bug: hand its traceback to the main process
        conn.send(("crash", traceback.format_exc()))


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_partitions(plan: list, options: Options, prefixes: dict, progress: "_Progress",
                   before_commit: Callable[[Stats], None]) -> Stats:
    """Run the partitions in parallel processes into shards, then join the shards in order."""
    directory = os.path.dirname(os.path.abspath(next(iter(prefixes.values()))))
    scratch = tempfile.mkdtemp(prefix=".moc-preprocess-", suffix=".tmp", dir=directory)
    ctx = mp_context()
    counters = ctx.Array("q", 3 * len(plan), lock=False)
    shard = lambda part, key: os.path.join(scratch, f"part{part}_{key}")  # noqa: E731
    part_options = replace(options, workers=max(1, options.workers // len(plan)))
    procs, conns = [], []
    try:
        for part, segments in enumerate(plan):
            here, there = ctx.Pipe(duplex=False)
            procs.append(ctx.Process(target=_partition_main, args=(
                part, segments, part_options, {k: shard(part, k) for k in options.keys}, counters, there)))
            procs[-1].start()
            there.close()
            conns.append(here)
        parts = _collect(procs, conns, lambda: progress.show_totals(counters))
        stats = Stats()
        for part in range(len(plan)):
            stats.add(parts[part])
        before_commit(stats)
        for key, prefix in prefixes.items():
            with IndexedDatasetWriter(prefix, options.dtype) as writer:
                for part in range(len(plan)):
                    writer.add_index(shard(part, key))
                writer.commit()
        return stats
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        shutil.rmtree(scratch, ignore_errors=True)


def _collect(procs: list, conns: list, tick: Callable[[], None]) -> dict:
    """Each partition's Stats; on errors, the error of the earliest failing partition in input order."""
    pending, done, errors = dict(enumerate(conns)), {}, {}
    while pending:
        ready = multiprocessing.connection.wait(list(pending.values()), timeout=0.2)
        tick()
        for part in sorted(p for p, conn in pending.items() if conn in ready):
            if part not in pending:
                continue  # stopped below because an earlier partition failed
            try:
                kind, payload = pending.pop(part).recv()
            except EOFError:
                raise RuntimeError(f"partition {part} died (exit code {procs[part].exitcode})") from None
            if kind == "crash":
                raise RuntimeError(f"partition {part} failed:\n{payload}")
            if kind == "ok":
                done[part] = payload
                continue
            errors[part] = payload
            for later in [p for p in pending if p > part]:  # only an earlier partition can still matter
                procs[later].terminate()
                del pending[later]
    tick()
    if errors:
        raise UserError(errors[min(errors)])
    return done


# ---------------------------------------------------------------- progress


class _Progress:
    """A tqdm bar (MB/s, documents/s, tokens/s) on a terminal; a line every --log-interval docs otherwise."""

    def __init__(self, total_bytes: Optional[int], log_interval: int) -> None:
        self.total_bytes, self.log_interval = total_bytes, log_interval
        self.docs = self.tokens = self.bytes = self._next_log = 0
        self.start = time.perf_counter()
        self._bar = None  # created on first use, after the worker processes have forked

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs, self.tokens, self.bytes = self.docs + docs, self.tokens + tokens, self.bytes + nbytes
        self._show(nbytes)

    def show_totals(self, counters) -> None:
        totals = [sum(counters[i::3]) for i in range(3)]
        delta = totals[2] - self.bytes
        self.docs, self.tokens, self.bytes = totals
        self._show(delta)

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s, "
                f"{self.bytes / elapsed / 1e6:,.2f} MB/s")

    def _show(self, delta_bytes: int) -> None:
        if sys.stderr.isatty():
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, desc="tokenising",
                                 file=sys.stderr)
            self._bar.update(delta_bytes)
            self._bar.set_postfix_str(self.rates().rsplit(",", 1)[0], refresh=False)
        elif self.log_interval and self.docs >= self._next_log + self.log_interval:
            self._next_log = self.docs - self.docs % self.log_interval
            print(f"processed {self.docs:,} documents ({self.rates()})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------- entry points


def preprocess(inputs: list[str], output_prefix: str, tokenizer: Tokenizer, json_keys: tuple[str, ...] = ("text",),
               append_eod: bool = False, workers: int = 1, partitions: int = 1, skip_bad_lines: bool = False,
               log_interval: int = 1000) -> Stats:
    """Tokenise ``inputs`` (paths or globs) into ``{output_prefix}_{key}_document`` per json key."""
    if workers < 1 or partitions < 1:
        raise UserError("--workers and --partitions must be at least 1")
    paths = expand_inputs(inputs)
    if len(json_keys) != 1 and any(input_format(p) == "text" for p in paths):
        raise UserError("--json-keys: .txt inputs hold one document per line, so give exactly one key")
    if len(set(json_keys)) != len(json_keys):
        raise UserError(f"--json-keys {' '.join(json_keys)}: a key is repeated")
    options = Options(tuple(json_keys), tokenizer, append_eod, skip_bad_lines, workers,
                      token_dtype(tokenizer.vocab_size))
    prefixes = {k: f"{output_prefix}_{k}_document" for k in json_keys}
    plan = plan_segments(paths, partitions)
    plain = all(not p.endswith(".gz") for p in paths)
    progress = _Progress(sum(os.path.getsize(p) for p in paths) if plain else None, log_interval)
    try:
        if len(plan) == 1:
            stats = run_partition(plan[0], options, prefixes, progress.update, _require_documents)
        else:
            stats = run_partitions(plan, options, prefixes, progress, _require_documents)
    finally:
        progress.close()
    _report(stats, prefixes, progress)
    return stats


def _require_documents(stats: Stats) -> None:
    for key, count in stats.documents.items():
        if count == 0:
            raise UserError(f"--input: no non-empty documents under key {key!r}; nothing written")


def _report(stats: Stats, prefixes: dict, progress: _Progress) -> None:
    for key, prefix in prefixes.items():
        print(f"{prefix}: {stats.documents[key]:,} documents, {stats.tokens[key]:,} tokens, "
              f"{stats.empty[key]:,} empty documents skipped")
    if stats.bad_lines:
        print(f"skipped {stats.bad_lines:,} bad lines, e.g.:\n  " + "\n  ".join(stats.bad_examples))
    print(f"done: {progress.rates()}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moc-preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="Input files or globs (.jsonl, .json, .txt, optionally .gz); with --merge, "
                        "dataset prefixes, .bin/.idx paths, globs or directories.")
    p.add_argument("--output-prefix", required=True, help="Outputs are {prefix}_{key}_document.bin/.idx "
                                                          "(with --merge: {prefix}.bin/.idx).")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenise, one dataset each.")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="Tokenizer backend.")
    p.add_argument("--tokenizer-model", help="sentencepiece .model file or Hugging Face tokenizer directory.")
    p.add_argument("--vocab-size", type=int, help="NullTokenizer only: the number of text ids.")
    p.add_argument("--append-eod", action="store_true", help="End every document with the end-of-document id.")
    p.add_argument("--workers", type=int, default=1,
                   help="Tokenising processes in all (divided among partitions, at least one each).")
    p.add_argument("--partitions", type=int, default=1,
                   help="Cut the input into this many byte ranges processed at once (same output).")
    p.add_argument("--log-interval", type=int, default=1000,
                   help="When stderr is not a terminal, report progress every this many documents.")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="Count and skip lines that are not UTF-8, not JSON or lack a key, instead of stopping.")
    p.add_argument("--merge", action="store_true", help="Join the --input datasets into one, in order.")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Command line entry point; returns the exit status (2 for a user error)."""
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)  # so a killed run still cleans up
    try:
        if args.merge:
            count = merge_datasets(resolve_prefixes(args.input), args.output_prefix)
            print(f"{args.output_prefix}: {count:,} documents")
        else:
            if not args.tokenizer_type:
                raise UserError("--tokenizer-type is required (unless --merge)")
            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
            preprocess(args.input, args.output_prefix, tokenizer, tuple(args.json_keys), args.append_eod,
                       args.workers, args.partitions, args.skip_bad_lines, args.log_interval)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
