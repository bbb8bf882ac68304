"""GPT datasets through megatron-core's builder, blends, per-component validation, sampler."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import cache

import numpy
import pytest
import torch

from megatron_latent.data.datasets import (
    DataConfig,
    build_gpt_datasets,
    build_valid_datasets_per_component,
    parse_blend,
)
from megatron_latent.data.indexed import DatasetPathError
from megatron_latent.data.samplers import PretrainingSampler, build_pretraining_data_loader
from megatron_latent.data.tokenizers import build_tokenizer

from data_fixtures import REPO, sentencepiece_model, synthetic_dataset, workdir, write_indexed

A_RANGE = (10, 100)  # tokens of dataset A
B_RANGE = (200, 300)  # tokens of dataset B


@cache
def tokenizer():
    return build_tokenizer("SentencePieceTokenizer", tokenizer_model=sentencepiece_model())


@cache
def datasets() -> tuple[str, str]:
    """Two document-level datasets with disjoint token ranges."""
    eod = tokenizer().eod
    base = os.path.join(workdir(), "blend")
    os.makedirs(base, exist_ok=True)
    a = synthetic_dataset(os.path.join(base, "a"), *A_RANGE, 300, eod, seed=1, vocab_size=400)
    b = synthetic_dataset(os.path.join(base, "b"), *B_RANGE, 200, eod, seed=2, vocab_size=400)
    return a, b


def _tokens(dataset, indices=None) -> list[list[int]]:
    indices = range(len(dataset)) if indices is None else indices
    return [dataset[i]["tokens"].tolist() for i in indices]


def _origin(tokens: list[int]) -> str:
    content = [t for t in tokens if t != tokenizer().eod]
    if all(A_RANGE[0] <= t < A_RANGE[1] for t in content):
        return "a"
    if all(B_RANGE[0] <= t < B_RANGE[1] for t in content):
        return "b"
    return "mixed"


def test_same_seed_same_samples_other_seed_other_order(tmp_path):
    a, _ = datasets()
    runs = []
    for name, seed in (("first", 7), ("second", 7), ("third", 8)):
        config = DataConfig(
            data_path=[a], split="90,10,0", seq_length=32, seed=seed,
            data_cache_path=str(tmp_path / name),
        )  # fmt: skip
        train, valid, test = build_gpt_datasets(config, tokenizer(), 200, 20, None)
        assert test is None  # split gives test nothing
        assert len(train) >= 200 and len(valid) >= 20
        assert train[0]["tokens"].shape == (32,) and train[0]["labels"].shape == (32,)
        runs.append((_tokens(train, range(200)), _tokens(valid, range(20))))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]
    assert sorted(map(tuple, runs[0][1])) != sorted(map(tuple, runs[0][0][:20]))


def test_labels_masks_and_eod_options():
    a, _ = datasets()
    eod = tokenizer().eod
    config = DataConfig(data_path=[a], split="1,0,0", seq_length=64, eod_mask_loss=True,
                        reset_position_ids=True, create_attention_mask=False)  # fmt: skip
    train, _, _ = build_gpt_datasets(config, tokenizer(), 50, None, None)
    sample = train[3]
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    is_eod = sample["tokens"] == eod
    assert is_eod.any()
    assert torch.equal(sample["loss_mask"] == 0, is_eod)
    first_eod = int(torch.nonzero(is_eod)[0])
    assert sample["position_ids"][first_eod + 1] == 0
    assert "attention_mask" not in sample


def test_blend_follows_the_requested_weights(tmp_path):
    a, b = datasets()
    config = DataConfig(data_path=["0.7", a, "0.3", b], split="1,0,0", seq_length=16,
                        data_cache_path=str(tmp_path / "cache"))  # fmt: skip
    train, _, _ = build_gpt_datasets(config, tokenizer(), 2000, None, None)
    assert len(train) == 2000
    ids = numpy.array([train[i]["dataset_id"] for i in range(len(train))])
    assert abs((ids == 0).mean() - 0.7) < 0.01
    origins = [_origin(t) for t in _tokens(train, range(0, 2000, 7))]
    expected = ["a" if i == 0 else "b" for i in ids[0:2000:7]]
    assert origins == expected
    assert any(name.endswith("BlendedDataset-train-dataset_index.npy")
               for name in os.listdir(tmp_path / "cache"))  # fmt: skip


def test_per_split_paths_and_per_component_validation():
    a, b = datasets()
    config = DataConfig(train_data_path=[a], valid_data_path=[a, b], seq_length=16)
    train, valid, test = build_gpt_datasets(config, tokenizer(), 100, 40, None)
    assert test is None
    assert {_origin(t) for t in _tokens(train, range(100))} == {"a"}
    per = build_valid_datasets_per_component(config, tokenizer(), None)
    assert [name for name, _ in per] == [a, b]
    assert {_origin(t) for t in _tokens(per[0][1])} == {"a"}
    assert {_origin(t) for t in _tokens(per[1][1])} == {"b"}
    # valid_samples None: one full epoch of each component.
    tokens_b = sum(int(n) for n in per[1][1].dataset.sequence_lengths)
    assert len(per[1][1]) == (tokens_b - 1) // 16


def test_per_component_validation_matches_the_blended_validation_split(tmp_path):
    a, b = datasets()
    single = DataConfig(data_path=[a], split="80,20,0", seq_length=16)
    _, valid, _ = build_gpt_datasets(single, tokenizer(), 10, 30, None)
    ((name, own),) = build_valid_datasets_per_component(single, tokenizer(), 30)
    assert name == a
    assert _tokens(own, range(30)) == _tokens(valid, range(30))

    blend = DataConfig(data_path=["0.5", a, "0.5", b], split="80,20,0", seq_length=16)
    per = dict(build_valid_datasets_per_component(blend, tokenizer(), 25))
    assert {_origin(t) for t in _tokens(per[a], range(25))} == {"a"}
    assert {_origin(t) for t in _tokens(per[b], range(25))} == {"b"}
    # The component's validation documents are the ones it gives the blend, none of train's.
    _, blended_valid, _ = build_gpt_datasets(blend, tokenizer(), 100, 50, None)
    assert set(per[a].indices.tolist()) == set(blended_valid.datasets[0].indices.tolist())
    train_a = build_gpt_datasets(blend, tokenizer(), 100, 50, None)[0].datasets[0]
    assert not set(per[a].indices.tolist()) & set(train_a.indices.tolist())


def test_mock_data():
    config = DataConfig(mock_data=True, seq_length=32)
    train, valid, test = build_gpt_datasets(config, tokenizer(), 10, 5, 5)
    assert len(train) >= 10 and len(valid) >= 5 and len(test) >= 5
    sample = train[0]["tokens"]
    assert sample.shape == (32,) and int(sample.max()) < tokenizer().vocab_size
    ((name, mock_valid),) = build_valid_datasets_per_component(config, tokenizer(), 5)
    assert name == "mock" and len(mock_valid) >= 5


def test_bad_data_paths_fail_before_any_work(tmp_path):
    a, _ = datasets()
    cache_dir = tmp_path / "cache"
    missing = str(tmp_path / "nowhere" / "corpus_text_document")
    with pytest.raises(DatasetPathError, match=f"data path '{missing}': '{missing}.idx' does"):
        build_gpt_datasets(
            DataConfig(data_path=[a, missing], data_cache_path=str(cache_dir)),
            tokenizer(), 10, 10, 10,
        )  # fmt: skip
    assert not cache_dir.exists()

    with pytest.raises(DatasetPathError, match=r"give the prefix, without \.bin/\.idx"):
        build_gpt_datasets(DataConfig(data_path=[a + ".bin"]), tokenizer(), 10, 10, 10)

    corrupt = tmp_path / "corrupt"
    (tmp_path / "corrupt.bin").write_bytes(b"\x00" * 8)
    (tmp_path / "corrupt.idx").write_bytes(b"not an index at all, really not one")
    with pytest.raises(DatasetPathError, match="is not a Megatron indexed dataset index"):
        build_gpt_datasets(DataConfig(train_data_path=[str(corrupt)]), tokenizer(), 10, 0, 0)

    sentences = write_indexed(str(tmp_path / "sents"), [[[10, 11], [12, 2]]], vocab_size=400)
    with pytest.raises(DatasetPathError, match="is sentence-level"):
        build_gpt_datasets(DataConfig(data_path=[sentences]), tokenizer(), 10, 10, 10)

    with pytest.raises(ValueError, match="weighted blend needs a valid sample count"):
        build_gpt_datasets(DataConfig(data_path=["1", a, "2", a]), tokenizer(), 10, None, 1)


def test_data_config_validation_and_blend_parsing():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    with pytest.raises(ValueError, match="mixes weights and paths"):
        parse_blend(["0.7", "a", "b"])
    with pytest.raises(ValueError, match="exactly one of"):
        DataConfig(data_path=["a"], mock_data=True)
    with pytest.raises(ValueError, match="exactly one of"):
        DataConfig()
    with pytest.raises(ValueError, match="split applies to data_path"):
        DataConfig(train_data_path=["a"], split="1,0,0")
    assert DataConfig(data_path=["a"]).split == "969,30,1"
    for bad in ("abc", "0,0,0", "1,2,3,4", "-1,2"):
        with pytest.raises(ValueError, match="comma-separated non-negative numbers"):
            DataConfig(data_path=["a"], split=bad)


def _global_batches(dataset, dp: int, micro: int, steps: int, accumulation: int,
                    consumed: int = 0) -> list[list[list[int]]]:
    """Per step, the ranks' micro-batches concatenated (micro-step major, then rank)."""
    iterators = [
        iter(build_pretraining_data_loader(dataset, consumed, micro, rank, dp))
        for rank in range(dp)
    ]
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(accumulation):
            for it in iterators:
                batch.extend(next(it)["tokens"].tolist())
        out.append(batch)
    return out


def test_global_batch_does_not_depend_on_data_parallel_size_and_resumes():
    a, _ = datasets()
    train, _, _ = build_gpt_datasets(
        DataConfig(data_path=[a], split="1,0,0", seq_length=16), tokenizer(), 200, None, None
    )
    global_batch = 8
    reference = _global_batches(train, dp=1, micro=2, steps=6, accumulation=4)
    for dp, micro in ((2, 2), (4, 1), (2, 4)):
        accumulation = global_batch // (dp * micro)
        assert _global_batches(train, dp, micro, 6, accumulation) == reference
    # Global sample order: the dataset's own order.
    assert reference[0] == _tokens(train, range(8))
    # Resuming from consumed samples continues exactly.
    resumed = _global_batches(train, dp=2, micro=2, steps=3, accumulation=2, consumed=3 * 8)
    assert resumed == reference[3:6]


def test_sampler_indices_and_drop_last():
    rank1 = PretrainingSampler(22, 4, micro_batch_size=3, data_parallel_rank=1,
                               data_parallel_size=2)  # fmt: skip
    assert list(rank1) == [[7, 8, 9], [13, 14, 15], [19, 20, 21]]
    assert len(rank1) == 3
    dropped = [PretrainingSampler(20, 4, 3, r, 2) for r in range(2)]
    assert [list(s) for s in dropped] == [[[4, 5, 6], [10, 11, 12]], [[7, 8, 9], [13, 14, 15]]]
    assert [len(s) for s in dropped] == [2, 2]
    tail = [PretrainingSampler(20, 4, 3, r, 2, drop_last=False) for r in range(2)]
    assert list(tail[0])[-1] == [16, 17, 18] and list(tail[1])[-1] == [19]
    assert [len(s) for s in tail] == [len(list(s)) for s in tail] == [3, 3]
    with pytest.raises(ValueError, match="consumed_samples"):
        PretrainingSampler(10, 11, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        PretrainingSampler(10, 0, 1, 2, 2)
    assert build_pretraining_data_loader(None, 0, 1) is None


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    sys.path.insert(0, sys.argv[1])
    from megatron_latent.data.datasets import DataConfig, build_gpt_datasets
    from megatron_latent.data.tokenizers import build_tokenizer

    model, a, b, store, out = sys.argv[2:7]

    def build(rank_filter=None):
        tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
        config = DataConfig(data_path=["0.6", a, "0.4", b], split="90,10,0", seq_length=16,
                            data_cache_path=os.path.join(out, "cache"))
        train, valid, _ = build_gpt_datasets(config, tok, 64, 16, None, rank_filter)
        if train is None:
            return None
        return [train[i]["tokens"].tolist() for i in range(64)] + \\
               [valid[i]["tokens"].tolist() for i in range(16)]

    def rank_main(rank):
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
        built = build()
        only_zero = build(lambda: dist.get_rank() == 0)
        torch.save({"built": built, "only_zero": only_zero}, os.path.join(out, f"r{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        # Fork the ranks before this process runs any torch op (its thread pools would not
        # survive a fork), then build once more here without a process group.
        mp.start_processes(rank_main, nprocs=2, start_method="fork")
        torch.save(build(), os.path.join(out, "single.pt"))
    """
)


def test_builds_the_same_with_torch_distributed_on_two_ranks(tmp_path):
    a, b = datasets()
    script = tmp_path / "dist_build.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), REPO, sentencepiece_model(), a, b,
         str(tmp_path / "store"), str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    single = torch.load(tmp_path / "single.pt")
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    assert ranks[0]["built"] == ranks[1]["built"] == single
    assert ranks[0]["only_zero"] == single and ranks[1]["only_zero"] is None
