"""Concept-label datasets aligned with a token dataset, and the windows they were made on.

For a token dataset ``data`` (``.bin/.idx``, as ``tools/preprocess_data.py`` writes) and an
output prefix ``out`` there are three indexed datasets with the same documents and sequences
as ``data``, each sequence of n tokens holding n × K values (K labels per token, flattened
token-major): ``out_ids`` (int32 latent ids), ``out_scores`` (float32 attribution scores) and
``out_weights`` (uint8, 0 = no concept loss on that label), plus ``out.labels.json``: the
teacher, SAE, layer, K, window length, and the identity of ``data`` (sizes and the SHA-256 of
its ``.idx``) and of the three outputs. The JSON is removed first and written last, so the
labels read as valid only when all four files belong to one finished run.

Windows: the dataset's tokens concatenated in file order (documents with their end-of-document
tokens, as GPT pretraining reads them) cut into consecutive windows of ``seq_length`` tokens;
the last, shorter window takes the remaining tokens. Training samples start elsewhere (Megatron
draws windows at shuffled offsets, one token longer), and g_t depends on the window, so labels
for a training sample are an approximation (decision 4) unless the windows coincide.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..fileio import atomic_write, atomic_write_text

FORMAT = "megatron-latent concept labels"
VERSION = 1
PARTS = {"ids": np.int32, "scores": np.float32, "weights": np.uint8}
META_SUFFIX = ".labels.json"


class LabelsError(ValueError):
    """Labels that are missing, incomplete, or made for other data (names the path)."""


def part_prefix(output_prefix: str, part: str) -> str:
    """``{output_prefix}_{part}`` for part in ids, scores, weights."""
    return f"{output_prefix}_{part}"


def meta_path(output_prefix: str) -> str:
    return output_prefix + META_SUFFIX


def dataset_identity(prefix: str) -> dict[str, Any]:
    """Sizes of ``prefix.bin``/``.idx`` and the SHA-256 of the ``.idx`` (its layout)."""
    digest = hashlib.sha256()
    with open(prefix + ".idx", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"idx_sha256": digest.hexdigest(), "idx_bytes": os.path.getsize(prefix + ".idx"),
            "bin_bytes": os.path.getsize(prefix + ".bin")}


def window_bounds(num_tokens: int, seq_length: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of the windows (see the module doc)."""
    starts = range(0, num_tokens, seq_length)
    return [(s, min(s + seq_length, num_tokens)) for s in starts]


@dataclass
class Chunk:
    """Labels of the tokens [start, end) of the concatenated stream: [n, K] arrays."""

    start: int
    ids: np.ndarray
    scores: np.ndarray
    weights: np.ndarray

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


def save_chunk(path: str, chunk: Chunk) -> None:
    """Write a chunk through a temporary file and a rename (complete or absent)."""
    atomic_write(path, lambda tmp: np.savez(
        tmp, start=np.int64(chunk.start), ids=chunk.ids.astype(np.int32),
        scores=chunk.scores.astype(np.float32), weights=chunk.weights.astype(np.uint8)),
        suffix=".npz")


def load_chunk(path: str) -> Chunk:
    with np.load(path) as data:
        return Chunk(int(data["start"]), data["ids"], data["scores"], data["weights"])


def write_label_datasets(output_prefix: str, data_prefix: str, chunks: Iterator[Chunk],
                         meta: dict[str, Any]) -> dict[str, Any]:
    """Write the three datasets with ``data_prefix``'s document/sequence layout from chunks
    covering its token stream in order, then the JSON sidecar (``meta`` + identities)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from ..data.indexed import AtomicIndexedDatasetWriter

    if os.path.exists(meta_path(output_prefix)):
        os.remove(meta_path(output_prefix))
    data = IndexedDataset(data_prefix)
    lengths = np.asarray(data.sequence_lengths, dtype=np.int64)
    documents = np.asarray(data.document_indices, dtype=np.int64)
    writers = {part: AtomicIndexedDatasetWriter(part_prefix(output_prefix, part), dtype)
               for part, dtype in PARTS.items()}
    try:
        reader = _StreamReader(chunks)
        for first, last in zip(documents[:-1], documents[1:]):
            seq_lengths = lengths[first:last]
            block = reader.take(int(seq_lengths.sum()))
            for part, writer in writers.items():
                writer.add_document(block[part].reshape(-1), (seq_lengths * reader.k).tolist())
        reader.finish()
        for writer in writers.values():
            writer.commit()
    finally:
        for writer in writers.values():
            writer.abort()
    full = dict(meta, format=FORMAT, version=VERSION, k=reader.k,
                data=dict(dataset_identity(data_prefix), path=os.path.abspath(data_prefix)),
                outputs={part: dataset_identity(part_prefix(output_prefix, part))
                         for part in PARTS})
    atomic_write_text(meta_path(output_prefix), json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


class _StreamReader:
    """Token-ordered reads across consecutive chunks."""

    def __init__(self, chunks: Iterator[Chunk]):
        self.chunks = iter(chunks)
        self.current: Chunk | None = None
        self.offset = 0
        self.position = 0
        self.k = 0

    def _next(self) -> None:
        self.current = next(self.chunks, None)
        if self.current is None:
            raise LabelsError(f"the label chunks end at token {self.position}, before the data")
        if self.current.start != self.position:
            raise LabelsError(f"a label chunk starts at token {self.current.start}, "
                              f"expected {self.position}")
        self.k = int(self.current.ids.shape[1])
        self.offset = 0

    def take(self, n: int) -> dict[str, np.ndarray]:
        pieces: dict[str, list[np.ndarray]] = {part: [] for part in PARTS}
        while n > 0:
            if self.current is None or self.offset == len(self.current.ids):
                self._next()
            step = min(n, len(self.current.ids) - self.offset)
            for part in PARTS:
                pieces[part].append(getattr(self.current, part)[self.offset:self.offset + step])
            self.offset += step
            self.position += step
            n -= step
        if self.k == 0:
            self._next()
        return {part: np.concatenate(p) if p else np.zeros((0, self.k), PARTS[part])
                for part, p in pieces.items()}

    def finish(self) -> None:
        if self.current is not None and self.offset != len(self.current.ids):
            raise LabelsError("the label chunks hold more tokens than the data")
        if next(self.chunks, None) is not None:
            raise LabelsError("the label chunks hold more tokens than the data")


@dataclass
class ConceptLabels:
    """Finished label datasets: ``sequence(i)`` -> (ids, scores, weights), each [n, K]."""

    prefix: str
    meta: dict[str, Any]
    parts: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def __len__(self) -> int:
        return len(self.parts["ids"])

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = [self.parts[p].get(index).reshape(-1, self.k) for p in PARTS]
        return got[0], got[1], got[2]


def read_labels(output_prefix: str, data_prefix: str | None = None,
                identity: Callable[[str], dict[str, Any]] = dataset_identity
                ) -> ConceptLabels:
    """Open finished labels; with ``data_prefix``, refuse labels made for other data."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = meta_path(output_prefix)
    if not os.path.isfile(path):
        raise LabelsError(f"{path} not found: no finished concept labels at {output_prefix!r}")
    with open(path, encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LabelsError(f"{path}: not a {FORMAT!r} version {VERSION} file")
    for part in PARTS:
        prefix = part_prefix(output_prefix, part)
        if not os.path.isfile(prefix + ".idx") or identity(prefix) != meta["outputs"][part]:
            raise LabelsError(f"{prefix}.bin/.idx do not match {path} (another or unfinished "
                              "write); make the labels again")
    if data_prefix is not None:
        mine = {key: meta["data"][key] for key in ("idx_sha256", "idx_bytes", "bin_bytes")}
        if identity(data_prefix) != mine:
            raise LabelsError(f"{output_prefix!r} labels were made for {meta['data']['path']!r}"
                              f" (per {path}), which differs from {data_prefix!r}; make labels "
                              "for this dataset")
    parts = {part: IndexedDataset(part_prefix(output_prefix, part)) for part in PARTS}
    return ConceptLabels(output_prefix, meta, parts)
