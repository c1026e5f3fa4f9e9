"""Input files for the preprocessor, the tokenizer trainer and the chat dataset.

Formats: ``.jsonl`` and ``.json`` (one JSON object per line, as Megatron-LM reads them), ``.txt``
(one document per line), each optionally ``.gz``. Large inputs are read in blocks of whole lines;
plain files can be cut into byte ranges at line starts so that parts are processed independently and
joined in order. Line numbers (for error messages) are counted only when an error needs one.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from moc_megatron.errors import UserError

SUFFIXES = (".jsonl", ".json", ".txt")


def expand_inputs(patterns: list[str], option: str = "--input") -> list[str]:
    """Files named by paths or globs, each glob sorted, duplicates dropped, order otherwise kept."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise UserError(f"{option} {pattern}: no such file")
        for path in matches:
            if os.path.isdir(path):
                raise UserError(f"{option} {path}: is a directory; name files or a glob such as {path}/*.jsonl")
            input_format(path, option)
            if path not in paths:
                paths.append(path)
    return paths


def input_format(path: str, option: str = "--input") -> str:
    """'json' or 'text', from the file name; a UserError for anything else."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".json")):
        return "json"
    if name.endswith(".txt"):
        return "text"
    raise UserError(f"{option} {path}: unknown format; expected one of "
                    f"{', '.join(SUFFIXES)} (optionally .gz)")


def open_binary(path: str) -> io.BufferedIOBase:
    """The file's bytes, decompressed if it is .gz."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


@dataclass(frozen=True)
class Segment:
    """Whole lines of one file: bytes [start, end), end None meaning the end of the file."""

    path: str
    start: int = 0
    end: Optional[int] = None


def plan_segments(paths: list[str], parts: int) -> list[list[Segment]]:
    """Cut the inputs into at most ``parts`` contiguous, non-empty runs of whole lines of similar size.

    Plain files are cut at the first line start at or after each even share of the total size;
    .gz files cannot be entered in the middle, so a cut inside one moves to its end.
    """
    sizes = [_size(p) for p in paths]
    total = sum(sizes)
    cuts = {_cut_point(paths, sizes, total * k // parts) for k in range(1, parts)}
    bounds = sorted(cuts | {(0, 0), (len(paths), 0)})
    plan = []
    for (first, start), (last, end) in zip(bounds, bounds[1:]):
        part = []
        for i in range(first, min(last + 1, len(paths))):
            seg_start, seg_end = (start if i == first else 0), (end if i == last else None)
            if seg_end is None or seg_end > seg_start:
                part.append(Segment(paths[i], seg_start, seg_end))
        if part:
            plan.append(part)
    return plan


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise UserError(f"--input {path}: cannot read ({e.strerror})") from None


def _cut_point(paths: list[str], sizes: list[int], target: int) -> tuple[int, int]:
    """(file index, byte offset of a line start) for the cut nearest after ``target`` bytes."""
    for i, (path, size) in enumerate(zip(paths, sizes)):
        if target < size:
            if path.endswith(".gz") or target == 0:
                return (i + 1, 0) if target else (i, 0)
            return _next_line_start(path, target, size, i)
        target -= size
    return (len(paths), 0)


def _next_line_start(path: str, offset: int, size: int, file_index: int) -> tuple[int, int]:
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()
        position = f.tell()
    return (file_index + 1, 0) if position >= size else (file_index, position)


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """Read errors (a truncated or corrupt .gz, an I/O error) as user errors naming the file."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def read_blocks(segment: Segment, block_bytes: int) -> Iterator[bytes]:
    """The segment's bytes in blocks of about ``block_bytes``, each ending at a line end."""
    with _reading(segment.path), open_binary(segment.path) as f:
        if segment.start:
            f.seek(segment.start)
        left = -1 if segment.end is None else segment.end - segment.start
        while left:
            block = f.read(block_bytes if left < 0 else min(block_bytes, left))
            if not block:
                return
            if not block.endswith(b"\n"):
                block += f.readline()
            if left > 0:
                left -= len(block)
            yield block


def split_lines(block: bytes) -> list[bytes]:
    """The lines of a block of whole lines, without their line ends."""
    lines = block.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def line_number(path: str, offset: int) -> int:
    """The 1-based number of the line starting at byte ``offset`` of a file."""
    count, done = 1, 0
    with open_binary(path) as f:
        while done < offset:
            chunk = f.read(min(1 << 24, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its end) for every line of a file, streaming."""
    with _reading(path), open_binary(path) as f:
        for number, line in enumerate(f, start=1):
            yield number, line.rstrip(b"\r\n") if line.endswith(b"\n") else line.rstrip(b"\r")


def decode_line(path: str, number: int, line: bytes) -> str:
    """The line as text; a UserError naming file and line if it is not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{number}: not valid UTF-8 (byte {e.start})") from None
