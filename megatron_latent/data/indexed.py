"""Writing and checking Megatron ``.bin/.idx`` indexed datasets.

Writes go through megatron-core's ``IndexedDatasetBuilder`` (so the bytes are what Megatron-LM
writes) under temporary names, and are renamed into place only when complete: an interrupted
run never leaves a ``.bin/.idx`` pair that looks finished. A dataset may carry a third file,
``{prefix}.tokenizer.json``, naming the tokenizer that made it (see ``provenance.py``); it is
written in the same commit. Checks read the ``.idx`` header and a few values at known offsets
and compare them with the file sizes, so a bad data path is reported before any expensive
work and without reading whole files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy

INDEX_HEADER = b"MMIDIDX\x00\x00"
INCOMPLETE_SUFFIX = ".incomplete"
SIDECAR_SUFFIX = ".tokenizer.json"
HEADER_BYTES = 34  # magic (9), version (8), dtype code (1), sequence count (8), document count (8)


class DatasetPathError(ValueError):
    """A data path that does not name a readable, well-formed indexed dataset."""


def optimal_token_dtype(vocab_size: int) -> type[numpy.number]:
    """The token dtype Megatron-LM's preprocessing picks for a vocabulary size."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def sidecar_path(prefix: str) -> str:
    """Where the tokenizer sidecar of dataset ``prefix`` lives: ``{prefix}.tokenizer.json``."""
    return prefix + SIDECAR_SUFFIX


def dataset_prefix(output_prefix: str, key: str, level: str) -> str:
    """Megatron-LM's output naming: ``{prefix}_{key}_{level}`` (level: document|sentence)."""
    return f"{output_prefix}_{key}_{level}"


class AtomicIndexedDatasetWriter:
    """An ``IndexedDatasetBuilder`` whose files appear under their final names only on commit.

    While writing, the files are ``{prefix}.bin.incomplete`` and ``{prefix}.idx.incomplete``.
    ``commit()`` finalizes the index and renames: an existing ``.idx`` and sidecar are removed
    first, then the ``.bin`` and the new sidecar (``sidecar``, a JSON object, if given) are
    moved into place, and the new ``.idx`` last. So no moment shows a complete-looking dataset
    whose files (or sidecar) belong to different writes. ``abort()`` deletes the temporary
    files. As a context manager it aborts on an exception.
    """

    def __init__(
        self,
        prefix: str,
        dtype: type[numpy.number],
        sidecar: Mapping[str, Any] | None = None,
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.bin_path = prefix + ".bin"
        self.idx_path = prefix + ".idx"
        self.sidecar_path = sidecar_path(prefix)
        self.tmp_bin = self.bin_path + INCOMPLETE_SUFFIX
        self.tmp_idx = self.idx_path + INCOMPLETE_SUFFIX
        self.tmp_sidecar = self.sidecar_path + INCOMPLETE_SUFFIX
        self.sidecar = dict(sidecar) if sidecar is not None else None
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
        """Finalize the index and move the files to their final names (``.idx`` last)."""
        self.builder.finalize(self.tmp_idx)
        if self.sidecar is not None:
            _write_durably(self.tmp_sidecar, json.dumps(self.sidecar, indent=2) + "\n")
        for path in (self.idx_path, self.sidecar_path):
            if os.path.exists(path):
                os.remove(path)
        os.replace(self.tmp_bin, self.bin_path)
        if self.sidecar is not None:
            os.replace(self.tmp_sidecar, self.sidecar_path)
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
        for path in (self.tmp_bin, self.tmp_idx, self.tmp_sidecar):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> AtomicIndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def _write_durably(path: str, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to disk (the caller renames it into place)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class IndexHeader:
    """What the ``.idx`` header says about a dataset, with the sizes of both files."""

    prefix: str
    dtype_code: int
    sequence_count: int
    document_count: int  # as megatron counts it: number of documents + 1
    idx_bytes: int = 0
    bin_bytes: int = 0

    @property
    def dtype(self) -> type[numpy.number]:
        from megatron.core.datasets.indexed_dataset import DType

        return DType.dtype_from_code(self.dtype_code)

    @property
    def num_documents(self) -> int:
        return self.document_count - 1

    @property
    def num_tokens(self) -> int:
        """Tokens in the ``.bin`` (its size over the token size)."""
        return self.bin_bytes // numpy.dtype(self.dtype).itemsize

    @property
    def is_sentence_level(self) -> bool:
        """True when some document holds more than one sequence (``--split-sentences``)."""
        return self.sequence_count != self.num_documents


def read_index_header(prefix: str) -> IndexHeader:
    """Check that ``prefix.bin``/``prefix.idx`` exist, are readable and agree; read the header.

    The ``.idx`` must be as long as its header's counts imply, its last document must end at
    its last sequence, and the ``.bin`` must be exactly as long as the index's last pointer
    plus last length imply. This reads 34 bytes and three values at computed offsets: cheap
    for any size. Raises DatasetPathError naming the path, what is wrong and the sizes.
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
            head = f.read(HEADER_BYTES)
            if head and len(head) < HEADER_BYTES and INDEX_HEADER.startswith(head[:9]):
                raise DatasetPathError(
                    f"data path {prefix!r}: {idx_path!r} is truncated: it has {len(head)} "
                    f"bytes, less than the {HEADER_BYTES}-byte header; regenerate the dataset"
                )
            if len(head) < HEADER_BYTES or head[:9] != INDEX_HEADER:
                raise DatasetPathError(
                    f"data path {prefix!r}: {idx_path!r} is not a Megatron indexed dataset index"
                )
            (version,) = struct.unpack("<Q", head[9:17])
            if version != 1:
                raise DatasetPathError(
                    f"data path {prefix!r}: unsupported index version {version}"
                )
            code = head[17]
            sequence_count, document_count = struct.unpack("<QQ", head[18:34])
            header = IndexHeader(prefix, code, sequence_count, document_count)
            return _check_sizes(header, f, os.path.getsize(bin_path))
    except OSError as err:
        raise DatasetPathError(f"data path {prefix!r}: cannot read {idx_path!r}: {err}") from None


def _read_at(f, offset: int, fmt: str) -> int:
    f.seek(offset)
    data = f.read(struct.calcsize(fmt))
    return struct.unpack(fmt, data)[0]


def _check_sizes(header: IndexHeader, f, bin_bytes: int) -> IndexHeader:
    """``header`` with both file sizes, once they are what the index implies."""
    from megatron.core.datasets.indexed_dataset import DType

    prefix = header.prefix
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    where = f"data path {prefix!r}: "
    try:
        itemsize = numpy.dtype(DType.dtype_from_code(header.dtype_code)).itemsize
    except ValueError:
        raise DatasetPathError(
            f"{where}{idx_path!r} names an unknown token dtype code {header.dtype_code}"
        ) from None
    sequences, bounds = header.sequence_count, header.document_count
    counts = f"{sequences} sequences, {max(bounds - 1, 0)} documents"
    if bounds < 1:
        raise DatasetPathError(f"{where}{idx_path!r} has no document boundaries (corrupt)")
    idx_bytes = os.fstat(f.fileno()).st_size
    needed = HEADER_BYTES + sequences * (4 + 8) + bounds * 8
    # megatron-core's multimodal index adds one mode byte per sequence.
    if idx_bytes not in (needed, needed + sequences):
        state = "is truncated: it has" if idx_bytes < needed else "is too long: it has"
        raise DatasetPathError(
            f"{where}{idx_path!r} {state} {idx_bytes} bytes, but its header ({counts}) "
            f"implies {needed}; regenerate the dataset"
        )
    last_bound = _read_at(f, HEADER_BYTES + 12 * sequences + 8 * (bounds - 1), "<q")
    if last_bound != sequences:
        raise DatasetPathError(
            f"{where}{idx_path!r} is inconsistent: its last document ends at sequence "
            f"{last_bound}, but it holds {sequences} sequences; regenerate the dataset"
        )
    expected = 0
    if sequences:
        last_length = _read_at(f, HEADER_BYTES + 4 * (sequences - 1), "<i")
        last_pointer = _read_at(f, HEADER_BYTES + 4 * sequences + 8 * (sequences - 1), "<q")
        if last_length < 0 or last_pointer < 0 or last_pointer % itemsize:
            raise DatasetPathError(
                f"{where}{idx_path!r} is corrupt: its last sequence has length {last_length} "
                f"at byte {last_pointer}"
            )
        expected = last_pointer + last_length * itemsize
    if bin_bytes != expected:
        tokens = f"{expected // itemsize} tokens of {itemsize} bytes"
        if bin_bytes < expected:
            problem = (f"has {bin_bytes} bytes, but {idx_path!r} needs {expected} ({tokens}): "
                       "the .bin is truncated or belongs to another index")
        else:
            problem = (f"has {bin_bytes} bytes, but {idx_path!r} covers only {expected} "
                       f"({tokens}): the .bin and .idx come from different writes")
        raise DatasetPathError(
            f"{where}{bin_path!r} {problem}; regenerate (or copy) the .bin and .idx together"
        )
    return IndexHeader(prefix, header.dtype_code, sequences, bounds, idx_bytes, bin_bytes)


def data_files_key(prefix: str) -> dict[str, dict[str, int]]:
    """Size and modification time (ns) of ``prefix.bin`` and ``prefix.idx``.

    Rewriting a dataset changes at least its modification times, so anything cached from a
    dataset (megatron-core's sample indices) can be keyed on this.
    """
    key = {}
    for suffix in (".bin", ".idx"):
        stat = os.stat(prefix + suffix)
        key[suffix] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return key


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
