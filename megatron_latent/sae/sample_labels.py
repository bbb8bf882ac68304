"""Offline concept labels aligned with megatron-core GPT training samples.

A GPT sample i is the tokens of (document, offset) pieces found through the dataset's own
index arrays: ``shuffle_index[i]`` picks a row of ``sample_index``, whose rows i and i + 1 give
the first and last position in ``document_index`` and the offsets into those documents (as
``GPTDataset._query_document_sample_shuffle_indices`` reads them). ``LabeledGPTDataset`` walks
the same pieces in the label datasets (``megatron_latent.sae.labels``: the token dataset's
documents and sequences, K labels per token) and adds to each sample the labels of its
``tokens``, the first ``seq_length`` of the pieces' tokens:

- ``concept_ids`` [seq, K] int64, ``concept_scores`` [seq, K] float32;
- ``concept_weights`` [seq, K] float32 (the stored 0/1 uint8 weights), 0 on padding
  positions and on the whole of a padding sample (``idx`` None).

Labels are read per piece from the memory-mapped indexed datasets, never loaded whole.
A ``BlendedDataset`` is labeled component-wise: ``labels`` maps each component's data prefix
to its labels prefix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .labels import ConceptLabels, LabelsError, read_labels


def _indices(dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dataset's (document_index, sample_index, shuffle_index), memory-mapping them
    from megatron-core's cache when they are deferred (as megatron-core does)."""
    if dataset.shuffle_index is None:
        load = lambda path: np.load(path, allow_pickle=True, mmap_mode="r")  # noqa: E731
        dataset.shuffle_index = load(dataset.path_to_shuffle_index)
        dataset.sample_index = load(dataset.path_to_sample_index)
        dataset.document_index = load(dataset.path_to_document_index)
    return dataset.document_index, dataset.sample_index, dataset.shuffle_index


def sample_pieces(dataset: Any, idx: int) -> list[tuple[int, int, int | None]]:
    """(sequence, offset, length or None = to the end) pieces of GPT sample ``idx``, in order,
    covering its seq_length (+ extra token) tokens, exactly as megatron-core reads them."""
    document_index, sample_index, shuffle_index = _indices(dataset)
    extra = int(dataset.config.add_extra_token_to_sequence)
    row = int(shuffle_index[idx])
    beg, beg_offset = (int(v) for v in sample_index[row])
    end, end_offset = (int(v) for v in sample_index[row + 1])
    if beg == end:
        return [(int(document_index[beg]), beg_offset, end_offset - beg_offset + extra)]
    pieces: list[tuple[int, int, int | None]] = []
    for i in range(beg, end + 1):
        offset = beg_offset if i == beg else 0
        length = end_offset + extra if i == end else None
        pieces.append((int(document_index[i]), offset, length))
    return pieces


def open_labels(labels_prefix: str, data_prefix: str, k: int | None = None) -> ConceptLabels:
    """``read_labels`` (refuses labels made for other data) plus a K check when k is given."""
    labels = read_labels(labels_prefix, data_prefix)
    if k is not None and labels.k != k:
        raise LabelsError(f"{labels_prefix!r} labels (for {data_prefix!r}) hold K={labels.k} "
                          f"labels per token, expected K={k}")
    return labels


def sample_labels(dataset: Any, labels: ConceptLabels, idx: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64, scores float32, weights float32), each [seq_length, K], for the ``tokens``
    of GPT sample ``idx``; padding positions get id 0, score 0, weight 0."""
    k = labels.k
    seq = int(dataset.config.sequence_length)
    got: dict[str, list[np.ndarray]] = {"ids": [], "scores": [], "weights": []}
    taken = 0
    for sequence, offset, length in sample_pieces(dataset, idx):
        if taken >= seq:
            break
        if length is None:
            length = int(labels.parts["ids"].sequence_lengths[sequence]) // k - offset
        length = min(length, seq - taken)
        for part in got:
            values = labels.parts[part].get(sequence, offset=offset * k, length=length * k)
            got[part].append(np.asarray(values).reshape(length, k))
        taken += length
    out = []
    for part, dtype in (("ids", np.int64), ("scores", np.float32), ("weights", np.float32)):
        values = np.zeros((seq, k), dtype)
        if got[part]:
            block = np.concatenate(got[part])
            values[:len(block)] = block
        out.append(values)
    return out[0], out[1], out[2]


class LabeledGPTDataset(torch.utils.data.Dataset):
    """A built GPTDataset (or BlendedDataset of them) whose samples carry concept labels.

    ``labels``: the labels prefix (for a GPTDataset) or ``{data_prefix: labels_prefix}``
    (any dataset). Each labels prefix must have been made for its data prefix (refused
    otherwise, naming both) and, when ``k`` is given, hold K = ``k`` labels per token.
    """

    def __init__(self, dataset: Any, labels: str | Mapping[str, str], k: int | None = None):
        self.dataset = dataset
        components = list(getattr(dataset, "datasets", [dataset]))
        if isinstance(labels, str):
            if len(components) != 1 or components[0] is not dataset:
                raise ValueError("a blended dataset needs labels as {data_prefix: labels_prefix}")
            labels = {dataset.dataset_path: labels}
        by_path = {os.path.abspath(p): v for p, v in labels.items()}
        self.labels: list[ConceptLabels] = []
        for component in components:
            path = component.dataset_path
            if os.path.abspath(path) not in by_path:
                raise LabelsError(f"no concept labels given for data prefix {path!r}")
            self.labels.append(open_labels(by_path[os.path.abspath(path)], path, k))
        if len({lab.k for lab in self.labels}) > 1:
            raise LabelsError("the labels of a blend hold different K: "
                              + ", ".join(f"{lab.prefix!r} K={lab.k}" for lab in self.labels))
        self.k = self.labels[0].k

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int | None) -> dict[str, Any]:
        sample = dict(self.dataset[idx])
        component, local = 0, 0 if idx is None else idx
        if hasattr(self.dataset, "datasets"):
            if idx is None:
                raise ValueError("a blended dataset has no padding sample (idx None)")
            component = int(sample["dataset_id"])
            local = int(self.dataset.dataset_sample_index[idx])
        gpt = self.dataset.datasets[component] if hasattr(self.dataset, "datasets") \
            else self.dataset
        ids, scores, weights = sample_labels(gpt, self.labels[component], local)
        if idx is None:
            weights[:] = 0
        sample["concept_ids"] = torch.from_numpy(ids)
        sample["concept_scores"] = torch.from_numpy(scores)
        sample["concept_weights"] = torch.from_numpy(weights)
        return sample


__all__ = ["LabeledGPTDataset", "open_labels", "sample_labels", "sample_pieces"]
