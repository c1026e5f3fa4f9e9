"""Tokenising blocks of input lines in worker processes, in order (the engine of preprocess.py).

A block is whole lines of one input file. ``encode_block`` parses and tokenises it; ``EncoderPool``
runs ``--workers`` processes that each encode every ``workers``-th block, behind a private pipe, fed
by a reader thread. Private pipes rather than multiprocessing.Pool's shared queues: a worker killed
mid-message (an error, Ctrl-C) can never leave a shared lock held and hang the shutdown.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from dataclasses import dataclass
from itertools import chain
from typing import Iterator, Optional

import numpy as np

from moc_megatron.data.inputs import split_lines
from moc_megatron.data.tokenizer import Tokenizer
from moc_megatron.errors import UserError


@dataclass(frozen=True)
class Options:
    """How to tokenise, and with how many processes; picklable (the tokenizer rebuilds itself)."""

    keys: tuple[str, ...]
    tokenizer: Tokenizer
    append_eod: bool
    skip_bad_lines: bool
    workers: int
    dtype: type


class _BadLine(Exception):
    """A line that cannot be used; the message says why (the caller adds file and line)."""


def _worker_main(conn, options: Options, parent_ends: list) -> None:
    """A tokenising process: encode the blocks received on ``conn`` until it receives None."""
    for end in parent_ends:  # inherited by fork; closed so that a dead parent means EOF here
        end.close()
    # Ctrl-C reaches the whole process group; only the main process handles it, and it stops the
    # workers with SIGTERM, which must kill at once (not run the handler inherited from the parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            conn.send(("ok", encode_block(options, *item)))
        except Exception:  # noqa: BLE001 - a bug: hand its traceback to the main process
            conn.send(("crash", traceback.format_exc()))


def encode_block(options: Options, segment: int, line_offset: int, fmt: str, block: bytes) -> tuple:
    """Tokenise one block of whole lines (``segment`` and ``line_offset`` say where it came from).

    Returns ``(segment, line_offset, len(block), {key: (tokens, lengths, empty)}, bad)`` where ``bad``
    lists ``(line index in block, reason)``; without --skip-bad-lines it stops at the first.
    """
    texts, good, bad = [], [], []
    for index, raw in enumerate(split_lines(block)):
        try:
            values = _parse_line(raw, fmt, options.keys)
        except _BadLine as e:
            bad.append((index, str(e)))
            if not options.skip_bad_lines:
                break  # the lines before it are still tokenised: one of them may fail first
            continue
        if values is not None:
            texts.append(values)
            good.append(index)
    ids = _tokenize(options, texts, good, bad)
    if bad and not options.skip_bad_lines:
        return segment, line_offset, len(block), {}, bad[:1]
    packed = {key: _pack(options, ids[key]) for key in options.keys}
    return segment, line_offset, len(block), packed, bad


def _parse_line(raw: bytes, fmt: str, keys: tuple[str, ...]) -> Optional[tuple[str, ...]]:
    """The document text per key, or None for a blank JSON line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine(f"not valid UTF-8 (byte {e.start})") from None
    if fmt == "text":
        return (text[:-1] if text.endswith("\r") else text,)
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadLine(f"not valid JSON ({e.msg}, column {e.colno}); inputs hold one JSON object per line") \
            from None
    if not isinstance(obj, dict):
        raise _BadLine("not a JSON object")
    values = []
    for key in keys:
        if key not in obj:
            raise _BadLine(f"no key {key!r} (--json-keys)")
        if not isinstance(obj[key], str):
            raise _BadLine(f"the value of {key!r} is not a string")
        values.append(obj[key])
    return tuple(values)


def _tokenize(options: Options, texts: list, good: list, bad: list) -> dict:
    """Per key, the ids of every good line; a line the tokenizer rejects moves to ``bad``."""
    tok = options.tokenizer
    try:
        return {key: tok.tokenize_batch([t[k] for t in texts]) for k, key in enumerate(options.keys)}
    except UserError:
        pass
    ids: dict = {key: [] for key in options.keys}
    for index, values in zip(good, texts):
        try:
            row = [tok.tokenize(v) for v in values]
        except UserError as e:
            bad.append((index, str(e)))
            continue
        for key, value in zip(options.keys, row):
            ids[key].append(value)
    bad.sort()
    return ids


def _pack(options: Options, docs: list) -> tuple:
    """(concatenated tokens, per-document lengths, number of empty documents dropped)."""
    kept = [d for d in docs if len(d)]
    lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
    if kept and isinstance(kept[0], np.ndarray):
        tokens = np.concatenate(kept).astype(options.dtype, copy=False)
    else:
        tokens = np.fromiter(chain.from_iterable(kept), dtype=options.dtype, count=int(lengths.sum()))
    if options.append_eod:
        tokens = np.insert(tokens, np.cumsum(lengths), options.tokenizer.eod)
        lengths += 1
    return tokens, lengths, len(docs) - len(kept)


def mp_context():
    """fork where it exists: workers start at once and share the loaded tokenizer and imports."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class EncoderPool:
    """``workers`` tokenising processes; ``map`` encodes blocks in order. Use as a context manager."""

    def __init__(self, options: Options) -> None:
        ctx = mp_context()
        self._conns, self._procs = [], []
        for _ in range(options.workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(there, options, [*self._conns, here]), daemon=True)
            proc.start()
            there.close()
            self._conns.append(here)
            self._procs.append(proc)
        self._stop = threading.Event()
        self._window = threading.Semaphore(2 * options.workers)

    def __enter__(self) -> "EncoderPool":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._window.release()  # a reader thread waiting for room sees the stop
        for conn, proc in zip(self._conns, self._procs):
            if exc[0] is None:
                conn.send(None)
            else:
                proc.terminate()  # no need to let a doomed block finish
        for conn, proc in zip(self._conns, self._procs):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()

    def map(self, items: Iterator[tuple]) -> Iterator[tuple]:
        """encode_block over ``items`` (argument tuples), in order; block k goes to worker k % workers.

        A reader thread pulls ``items`` (the file reads) and keeps two blocks per worker in flight: the
        one being encoded and the next, already in the pipe, so no worker waits for this process.
        """
        sent: queue.SimpleQueue = queue.SimpleQueue()
        reader = threading.Thread(target=self._feed, args=(items, sent), name="preprocess-reader", daemon=True)
        reader.start()
        while (k := sent.get()) is not None:
            if isinstance(k, BaseException):
                raise k
            result = self._receive(k % len(self._conns))
            self._window.release()
            yield result

    def _feed(self, items: Iterator[tuple], sent: queue.SimpleQueue) -> None:
        try:
            for k, item in enumerate(items):
                self._window.acquire()
                if self._stop.is_set():
                    return
                self._conns[k % len(self._conns)].send(item)
                sent.put(k)
            sent.put(None)
        except BaseException as e:  # noqa: BLE001 - raised again in the consuming thread
            sent.put(e)

    def _receive(self, worker: int) -> tuple:
        try:
            kind, payload = self._conns[worker].recv()
        except EOFError:
            raise RuntimeError(f"a tokenising worker died (exit code {self._procs[worker].exitcode})") from None
        if kind == "crash":
            raise RuntimeError(f"a tokenising worker failed:\n{payload}")
        return payload
