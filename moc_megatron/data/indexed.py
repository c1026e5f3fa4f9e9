"""Megatron indexed datasets (.bin/.idx) written with megatron-core's builder, committed atomically.

``IndexedDatasetWriter`` is megatron-core's ``IndexedDatasetBuilder`` with two changes that large
corpora need: its index arrays are numpy arrays (12 bytes a document, not two Python ints), and
nothing appears at the output prefix until ``commit()``, which renames the finished ``.bin`` and then
the ``.idx`` into place. Any earlier stop leaves only ``*.tmp`` files (removed by ``abort()``), never a
``.bin``/``.idx`` pair that looks valid. The bytes written are exactly the stock builder's.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Iterable

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    _IndexReader,
    _IndexWriter,
    get_bin_path,
    get_idx_path,
)

from moc_megatron.errors import UserError


class _NumpyList:
    """An append-only numpy array that grows by doubling; what the builder's lists were used for."""

    def __init__(self, dtype, values: Iterable[int] = ()) -> None:
        self._data = np.zeros(1024, dtype=dtype)
        self._size = 0
        self.extend(values)

    def __len__(self) -> int:
        return self._size

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        view = self._data[: self._size]
        return view if dtype is None else view.astype(dtype, copy=False)

    def append(self, value: int) -> None:
        self.extend((value,))

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self._data.dtype)
        end = self._size + values.size
        if end > self._data.size:
            grown = np.zeros(max(end, 2 * self._data.size), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size:end] = values.ravel()
        self._size = end


class _VectorIndexWriter(_IndexWriter):
    """megatron-core's index writer with the sequence pointers computed by numpy, not a Python loop."""

    def _sequence_pointers(self, sequence_lengths) -> np.ndarray:
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1] * DType.size(self.dtype), out=pointers[1:])
        return pointers


class IndexedDatasetWriter(IndexedDatasetBuilder):
    """Writes the indexed dataset ``prefix``.bin/.idx; use as a context manager, call ``commit()``.

    Leaving the ``with`` block without ``commit()`` (an error, an interrupt) removes the temporaries.
    """

    def __init__(self, prefix: str, dtype: type) -> None:
        self.prefix = prefix
        tag = f"{os.getpid()}.tmp"
        self._tmp_bin, self._tmp_idx = f"{get_bin_path(prefix)}.{tag}", f"{get_idx_path(prefix)}.{tag}"
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise UserError(f"--output-prefix {prefix}: directory {directory} does not exist")
        super().__init__(self._tmp_bin, dtype=dtype)
        self.sequence_lengths = _NumpyList(np.int32)
        self.document_indices = _NumpyList(np.int64, [0])
        self._done = False

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` one-sequence documents whose tokens are concatenated in ``tokens``."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.data_file.write(memoryview(tokens).cast("B"))
        first = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths)
        self.document_indices.extend(np.arange(first + 1, first + 1 + len(lengths), dtype=np.int64))

    def add_index(self, path_prefix: str) -> None:
        """Append every document of the indexed dataset at ``path_prefix``."""
        index = _IndexReader(get_idx_path(path_prefix), multimodal=False)
        if index.dtype != self.dtype:
            raise UserError(f"{path_prefix}: tokens are {index.dtype.__name__}, but the output is "
                            f"{self.dtype.__name__}; merge only datasets made with one tokenizer")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(index.sequence_lengths)
        self.document_indices.extend(offset + index.document_indices[1:])
        del index
        with open(get_bin_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self.data_file, 1 << 24)

    def finalize(self, idx_path: str) -> None:
        """Close the .bin and write the index to ``idx_path`` (the stock layout, vectorised)."""
        self.data_file.close()
        with _VectorIndexWriter(idx_path, self.dtype) as writer:
            writer.write(np.asarray(self.sequence_lengths), None, np.asarray(self.document_indices))

    def commit(self) -> None:
        """Finish and move the dataset into place: the .bin first, the .idx (which makes it valid) last."""
        self.finalize(self._tmp_idx)
        final_idx = get_idx_path(self.prefix)
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(self._tmp_bin, get_bin_path(self.prefix))
        os.replace(self._tmp_idx, final_idx)
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far."""
        self.data_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True


def token_dtype(vocab_size: int) -> type:
    """The token dtype Megatron-LM picks for a vocabulary (uint16 below 65500 ids, else int32)."""
    return DType.optimal_dtype(vocab_size)


def resolve_prefixes(inputs: list[str], option: str = "--input") -> list[str]:
    """Dataset prefixes named by prefixes, .bin/.idx paths, globs of those, or directories (all inside)."""
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.idx")))
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
        else:
            found = [item]
        if not found:
            raise UserError(f"{option} {item}: no indexed dataset found")
        for path in found:
            prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
            if not IndexedDataset.exists(prefix):
                raise UserError(f"{option} {item}: {prefix}.bin and {prefix}.idx are not both present")
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


def merge_datasets(prefixes: list[str], output_prefix: str) -> int:
    """Join indexed datasets, in order, into one at ``output_prefix``; returns its document count."""
    if not prefixes:
        raise UserError("--merge needs at least one --input dataset")
    for prefix in prefixes:
        if os.path.abspath(prefix) == os.path.abspath(output_prefix):
            raise UserError(f"--input {prefix}: is also the --output-prefix")
    dtype = _IndexReader(get_idx_path(prefixes[0]), multimodal=False).dtype
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
        writer.commit()
        return writer.num_documents

