"""Merge and inspect indexed datasets (``tools/merge_datasets.py``, ``tools/inspect_dataset.py``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy

from megatron_latent.data.indexed import (
    AtomicIndexedDatasetWriter,
    DatasetPathError,
    find_dataset_prefixes,
    read_index_header,
)
from megatron_latent.data.provenance import (
    TokenizerFingerprint,
    merged_tokenizer,
    read_dataset_tokenizer,
)


def resolve_dataset_inputs(inputs: Sequence[str], exclude: str | None = None) -> list[str]:
    """Directories (their complete pairs, sorted) and prefixes -> an ordered prefix list."""
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = find_dataset_prefixes(item)
            if not found:
                raise DatasetPathError(f"--input directory {item!r} holds no .bin/.idx pairs")
        else:
            found = [item[:-4] if item.endswith((".bin", ".idx")) else item]
        for prefix in found:
            if exclude and os.path.abspath(prefix) == os.path.abspath(exclude):
                continue
            if prefix not in prefixes:
                prefixes.append(prefix)
    if not prefixes:
        raise DatasetPathError("no datasets to merge")
    return prefixes


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> dict[str, int | str]:
    """Concatenate datasets in order into ``output_prefix`` (written atomically).

    All inputs must store tokens in the same dtype, and those with a tokenizer sidecar must
    name the same tokenizer; the output gets that sidecar when every input has one. Returns
    document/sequence counts and ``tokenizer``, a note on the sidecar.
    """
    headers = [read_index_header(p) for p in prefixes]
    dtypes = {h.dtype_code for h in headers}
    if len(dtypes) > 1:
        listing = ", ".join(f"{h.prefix} ({numpy.dtype(h.dtype).name})" for h in headers)
        raise DatasetPathError(f"datasets store tokens in different dtypes: {listing}")
    tokenizer, note = merged_tokenizer(prefixes)
    sidecar = tokenizer.to_json() if tokenizer is not None else None
    with AtomicIndexedDatasetWriter(output_prefix, headers[0].dtype, sidecar) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
        writer.commit()
    return {
        "datasets": len(headers),
        "documents": sum(h.num_documents for h in headers),
        "sequences": sum(h.sequence_count for h in headers),
        "tokenizer": note,
    }


@dataclass
class DatasetSummary:
    """Counts of one indexed dataset."""

    prefix: str
    dtype: str
    documents: int
    sequences: int
    tokens: int
    document_lengths: numpy.ndarray  # tokens per document
    sequence_lengths: numpy.ndarray  # tokens per sequence
    tokenizer: TokenizerFingerprint | None = None  # from the sidecar, when there is one

    @property
    def is_sentence_level(self) -> bool:
        return self.sequences != self.documents


def summarize(prefix: str) -> DatasetSummary:
    """Read the index of ``prefix`` and count documents, sequences and tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    header = read_index_header(prefix)
    ds = IndexedDataset(prefix)
    seq_lengths = numpy.asarray(ds.sequence_lengths, dtype=numpy.int64)
    bounds = numpy.asarray(ds.document_indices, dtype=numpy.int64)
    cumulative = numpy.concatenate([[0], numpy.cumsum(seq_lengths)])
    doc_lengths = cumulative[bounds[1:]] - cumulative[bounds[:-1]]
    return DatasetSummary(
        prefix=prefix,
        dtype=numpy.dtype(header.dtype).name,
        documents=header.num_documents,
        sequences=header.sequence_count,
        tokens=int(seq_lengths.sum()),
        document_lengths=doc_lengths,
        sequence_lengths=seq_lengths,
        tokenizer=read_dataset_tokenizer(prefix),
    )


def length_histogram(lengths: numpy.ndarray, bins: int = 10) -> list[tuple[int, int, int]]:
    """``(low, high, count)`` rows over equal-width bins (inclusive bounds)."""
    lengths = numpy.asarray(lengths)
    if lengths.size == 0:
        return []
    low, high = int(lengths.min()), int(lengths.max())
    if low == high:
        return [(low, high, int(lengths.size))]
    edges = numpy.linspace(low, high + 1, bins + 1)
    counts, _ = numpy.histogram(lengths, bins=edges)
    rows = []
    for i, count in enumerate(counts):
        lo = int(numpy.ceil(edges[i]))
        hi = int(numpy.ceil(edges[i + 1])) - 1
        rows.append((lo, hi, int(count)))
    return rows


def format_histogram(rows: list[tuple[int, int, int]], width: int = 40) -> str:
    """Text bars for ``length_histogram`` rows."""
    if not rows:
        return "(empty)"
    peak = max(c for _, _, c in rows) or 1
    lines = []
    for lo, hi, count in rows:
        bar = "#" * max(1 if count else 0, round(width * count / peak))
        lines.append(f"{lo:>9}-{hi:<9} {count:>9}  {bar}")
    return "\n".join(lines)


def document_sequences(prefix: str, index: int) -> list[numpy.ndarray]:
    """The token sequences (sentences, or one) of document ``index``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    count = len(ds.document_indices) - 1
    if not 0 <= index < count:
        raise IndexError(f"document {index} out of range: {prefix!r} has {count} documents")
    lo, hi = int(ds.document_indices[index]), int(ds.document_indices[index + 1])
    return [numpy.array(ds[i]) for i in range(lo, hi)]


def render_document(sequences: list[numpy.ndarray], tokenizer=None) -> str:
    """A document for reading: its text, or one numbered line per sentence.

    A sentence-level document shows each sentence as ``[k] 'text'`` (Python repr, so the
    whitespace and newlines at the boundaries are visible). Sentence texts are cut from the
    decoded document, so whitespace a tokenizer would drop when decoding a sentence alone
    (SentencePiece's leading space) still shows. A final end-of-document token is written as
    its vocabulary entry. Without a tokenizer, token ids are shown.
    """
    if tokenizer is None:
        parts = [" ".join(str(int(t)) for t in seq) for seq in sequences]
    else:
        try:
            eod = tokenizer.eod
        except (AttributeError, ValueError):
            eod = None
        parts, ids, previous = [], [], ""
        for seq in sequences:
            seq = [int(t) for t in seq]
            marker = ""
            if eod is not None and seq and seq[-1] == eod:
                seq, marker = seq[:-1], tokenizer.inv_vocab.get(eod, "<eod>")
            ids.extend(seq)
            text = tokenizer.detokenize(ids)
            piece = text[len(previous):] if text.startswith(previous) else tokenizer.detokenize(seq)
            previous = text
            parts.append(piece + marker)
    if len(parts) == 1:
        return parts[0]
    return "\n".join(f"[{k}] {part!r}" for k, part in enumerate(parts))
