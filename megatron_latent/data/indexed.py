"""Writing and checking Megatron ``.bin/.idx`` indexed datasets.

Writes go through megatron-core's ``IndexedDatasetBuilder`` (so the bytes are what Megatron-LM
writes) under temporary names, and are renamed into place only when complete: an interrupted
run never leaves a ``.bin/.idx`` pair that looks finished. Checks read only the ``.idx``
header, so a bad data path is reported before any expensive work.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy

INDEX_HEADER = b"MMIDIDX\x00\x00"
INCOMPLETE_SUFFIX = ".incomplete"


class DatasetPathError(ValueError):
    """A data path that does not name a readable, well-formed indexed dataset."""


def optimal_token_dtype(vocab_size: int) -> type[numpy.number]:
    """The token dtype Megatron-LM's preprocessing picks for a vocabulary size."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def dataset_prefix(output_prefix: str, key: str, level: str) -> str:
    """Megatron-LM's output naming: ``{prefix}_{key}_{level}`` (level: document|sentence)."""
    return f"{output_prefix}_{key}_{level}"


class AtomicIndexedDatasetWriter:
    """An ``IndexedDatasetBuilder`` whose files appear under their final names only on commit.

    While writing, the files are ``{prefix}.bin.incomplete`` and ``{prefix}.idx.incomplete``.
    ``commit()`` finalizes the index and renames (an existing ``.idx`` is removed first and the
    new ``.idx`` renamed last, so no moment shows a complete-looking but mismatched pair).
    ``abort()`` deletes the temporary files. As a context manager it aborts on an exception.
    """

    def __init__(self, prefix: str, dtype: type[numpy.number]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.bin_path = prefix + ".bin"
        self.idx_path = prefix + ".idx"
        self.tmp_bin = self.bin_path + INCOMPLETE_SUFFIX
        self.tmp_idx = self.idx_path + INCOMPLETE_SUFFIX
        parent = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(parent, exist_ok=True)
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=dtype)
        self.dtype = dtype
        self._done = False

    def add_document(self, tokens: Sequence[int] | numpy.ndarray, lengths: Sequence[int]) -> None:
        """Append one document made of sequences of the given lengths."""
        self.builder.add_document(tokens, list(lengths))

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (must have the same token dtype)."""
        from megatron.core.datasets.indexed_dataset import DType

        info = read_index_header(prefix)
        if info.dtype != self.dtype:
            raise DatasetPathError(
                f"{prefix!r} stores tokens as {DType.dtype_from_code(info.dtype_code).__name__}, "
                f"but the output uses {numpy.dtype(self.dtype).name}; datasets made with "
                "tokenizers of different vocabulary sizes cannot be merged"
            )
        self.builder.add_index(prefix)

    def commit(self) -> None:
        """Finalize the index and move both files to their final names."""
        self.builder.finalize(self.tmp_idx)
        if os.path.exists(self.idx_path):
            os.remove(self.idx_path)
        os.replace(self.tmp_bin, self.bin_path)
        os.replace(self.tmp_idx, self.idx_path)
        self._done = True

    def abort(self) -> None:
        """Close and delete the temporary files."""
        if self._done:
            return
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for path in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> AtomicIndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


@dataclass(frozen=True)
class IndexHeader:
    """What the ``.idx`` header says about a dataset."""

    prefix: str
    dtype_code: int
    sequence_count: int
    document_count: int  # as megatron counts it: number of documents + 1

    @property
    def dtype(self) -> type[numpy.number]:
        from megatron.core.datasets.indexed_dataset import DType

        return DType.dtype_from_code(self.dtype_code)

    @property
    def num_documents(self) -> int:
        return self.document_count - 1

    @property
    def is_sentence_level(self) -> bool:
        """True when some document holds more than one sequence (``--split-sentences``)."""
        return self.sequence_count != self.num_documents


def read_index_header(prefix: str) -> IndexHeader:
    """Check that ``prefix.bin``/``prefix.idx`` exist and are readable; read the header.

    Raises DatasetPathError naming the path and what is wrong.
    """
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (idx_path, bin_path):
        if not os.path.exists(path):
            hint = ""
            if os.path.exists(path + INCOMPLETE_SUFFIX):
                hint = " (an unfinished write was found: rerun the tool that makes it)"
            elif path.endswith((".bin.bin", ".idx.bin", ".bin.idx", ".idx.idx")):
                hint = " (give the prefix, without .bin/.idx)"
            raise DatasetPathError(f"data path {prefix!r}: {path!r} does not exist{hint}")
        if not os.access(path, os.R_OK):
            raise DatasetPathError(f"data path {prefix!r}: {path!r} is not readable")
    try:
        with open(idx_path, "rb") as f:
            head = f.read(34)
    except OSError as err:
        raise DatasetPathError(f"data path {prefix!r}: cannot read {idx_path!r}: {err}") from None
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise DatasetPathError(
            f"data path {prefix!r}: {idx_path!r} is not a Megatron indexed dataset index"
        )
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise DatasetPathError(f"data path {prefix!r}: unsupported index version {version}")
    code = head[17]
    sequence_count, document_count = struct.unpack("<QQ", head[18:34])
    return IndexHeader(prefix, code, sequence_count, document_count)


def find_dataset_prefixes(directory: str) -> list[str]:
    """Sorted prefixes of the complete ``.bin/.idx`` pairs in a directory."""
    if not os.path.isdir(directory):
        raise DatasetPathError(f"{directory!r} is not a directory")
    names = set(os.listdir(directory))
    prefixes = []
    for name in sorted(names):
        if name.endswith(".idx") and name[:-4] + ".bin" in names:
            prefixes.append(os.path.join(directory, name[:-4]))
    return prefixes
