"""Concept labels aligned with GPT training samples (megatron_latent.sae.sample_labels).

The token dataset is written so that every token's value is its global position in the
concatenated stream + 1, and the labels of position p are a function of p alone; the expected
labels of any sample are then computed from the sample's own ``tokens``, without the module.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_latent.data.datasets import DataConfig, build_gpt_datasets
from megatron_latent.sae.labels import Chunk, LabelsError, write_label_datasets
from megatron_latent.sae.sample_labels import LabeledGPTDataset

from training_fixtures import write_token_dataset

K = 4
SEQ = 32
VOCAB = 20000  # token values are positions + 1 (< VOCAB), uint16 as the tokenizer expects


def _tokenizer():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    return NullTokenizer(VOCAB - 1)


def _lengths(prefix: str) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # keep it open while copying its memory-mapped index
    return np.array(dataset.sequence_lengths, dtype=np.int64)


def _position_dataset(prefix: str, lengths: np.ndarray, first: int = 1) -> str:
    """Documents of the given lengths whose tokens are their global positions + ``first``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    start = 0
    for n in lengths:
        builder.add_document(np.arange(start, start + n, dtype=np.int64) + first, [int(n)])
        start += int(n)
    builder.finalize(prefix + ".idx")
    return prefix


def _expected(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of global positions [n] -> ids, scores, weights [n, K]."""
    p = positions.astype(np.int64)[:, None]
    j = np.arange(K)[None, :]
    ids = p * K + j
    scores = (p + j / 8).astype(np.float32)
    weights = ((p + j) % 3 != 0).astype(np.uint8)
    return ids, scores, weights


def _write_labels(labels_prefix: str, data_prefix: str) -> None:
    total = int(_lengths(data_prefix).sum())
    ids, scores, weights = _expected(np.arange(total))
    write_label_datasets(labels_prefix, data_prefix, iter([Chunk(0, ids, scores, weights)]),
                         {"teacher": "test", "layer": 0, "window": SEQ})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_labels")
    base = write_token_dataset(str(root / "base" / "tokens"), num_documents=48, seed=3)
    lengths = _lengths(base)
    data = _position_dataset(str(root / "base" / "positions"), lengths)
    labels = str(root / "labels" / "positions")
    os.makedirs(os.path.dirname(labels))
    _write_labels(labels, data)
    config = DataConfig(data_path=[data], split="1,0,0", seq_length=SEQ, seed=11,
                        data_cache_path=str(root / "cache"))
    train, _, _ = build_gpt_datasets(config, _tokenizer(), 300, None, None)
    return root, data, labels, lengths, train


def _doc_of(lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return np.searchsorted(starts, positions, side="right") - 1


def test_labels_follow_every_sample(built):
    _, _, labels, lengths, train = built
    assert len(train) >= 300
    shuffle = np.asarray(train.shuffle_index)
    assert (shuffle != np.arange(len(shuffle))).any(), "the test needs a shuffled order"
    labeled = LabeledGPTDataset(train, labels, k=K)
    crossing = 0
    for i in list(range(len(train))) + [len(train) - 1]:
        sample = labeled[i]
        tokens = sample["tokens"].numpy()
        assert tokens.shape == (SEQ,) and (tokens > 0).all()  # no padding here
        positions = tokens - 1
        docs = _doc_of(lengths, positions)
        crossing += len(np.unique(docs)) > 1
        ids, scores, weights = _expected(positions)
        assert sample["concept_ids"].dtype.is_floating_point is False
        assert sample["concept_ids"].shape == (SEQ, K)
        np.testing.assert_array_equal(sample["concept_ids"].numpy(), ids, err_msg=f"sample {i}")
        np.testing.assert_array_equal(sample["concept_scores"].numpy(), scores)
        np.testing.assert_array_equal(sample["concept_weights"].numpy(), weights)
        assert str(sample["concept_scores"].dtype) == "torch.float32"
        assert str(sample["concept_weights"].dtype) == "torch.float32"
        assert str(sample["concept_ids"].dtype) == "torch.int64"
        # The GPT sample itself is unchanged.
        np.testing.assert_array_equal(tokens, train[i]["tokens"].numpy())
    assert crossing > 50, crossing  # many samples cross document boundaries


def test_padding_sample_has_no_weight(built):
    _, _, labels, _, train = built
    sample = LabeledGPTDataset(train, labels)[None]
    assert float(sample["concept_weights"].sum()) == 0.0


def test_refuses_labels_for_another_prefix_and_other_k(built):
    root, data, labels, _, train = built
    other = write_token_dataset(str(root / "other" / "tokens"), num_documents=20, seed=9)
    other_labels = str(root / "other" / "labels")
    _write_labels(other_labels, other)
    with pytest.raises(LabelsError) as error:
        LabeledGPTDataset(train, other_labels)
    assert other_labels in str(error.value) and data in str(error.value)
    with pytest.raises(LabelsError, match="K=4.*K=3"):
        LabeledGPTDataset(train, labels, k=3)


def test_blend_is_labeled_per_component(built):
    root, data, labels, lengths, _ = built
    second = _position_dataset(str(root / "base" / "second"), lengths[:30], first=10001)
    second_labels = str(root / "labels" / "second")
    _write_labels(second_labels, second)
    config = DataConfig(data_path=[data, second], split="1,0,0", seq_length=SEQ, seed=5,
                        data_cache_path=str(root / "cache"))
    blend, _, _ = build_gpt_datasets(config, _tokenizer(), 200, None, None)
    assert hasattr(blend, "datasets")
    with pytest.raises(ValueError):
        LabeledGPTDataset(blend, labels)
    labeled = LabeledGPTDataset(blend, {data: labels, second: second_labels}, k=K)
    seen = set()
    for i in range(len(blend)):
        sample = labeled[i]
        component = int(sample["dataset_id"])
        seen.add(component)
        positions = sample["tokens"].numpy() - (1 if component == 0 else 10001)
        assert (positions >= 0).all() and (positions < 10000).all()
        np.testing.assert_array_equal(sample["concept_ids"].numpy(), _expected(positions)[0])
    assert seen == {0, 1}
