"""Training, validation and test datasets through megatron-core's dataset builders.

``build_gpt_datasets`` is what the trainer calls: it turns a ``DataConfig`` (Megatron-LM's data
flags as a dataclass) into megatron-core ``GPTDataset`` / ``BlendedDataset`` objects built by
``BlendedMegatronDatasetBuilder``, or ``MockGPTDataset`` with ``mock_data``. Every data path is
checked (files present, readable, sizes that agree with the index, document-level, made with
the given tokenizer: see ``provenance.py``) before any index is built.

megatron-core caches each dataset's sample indices under a hash of its path and settings;
``GPTDataset`` here adds the size and modification time of the ``.bin/.idx`` to that hash, so
a dataset regenerated at the same path gets fresh indices while an unchanged one reuses them.

megatron-core builds on global rank 0 first and on the other ranks after a barrier when
``torch.distributed`` is initialized (the others then read rank 0's cached indices), and simply
builds when it is not; both work here. ``is_built_on_rank`` decides which ranks get a dataset
(default: every rank), as in Megatron-LM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from megatron.core.datasets import gpt_dataset

from megatron_latent.data.indexed import DatasetPathError, data_files_key, read_index_header
from megatron_latent.data.provenance import check_datasets_tokenizer

DEFAULT_SPLIT = "969,30,1"

SplitDatasets = tuple[object | None, object | None, object | None]


@dataclass
class DataConfig:
    """Where the data is and how samples are drawn (Megatron-LM's ``--data-*`` flags).

    Give exactly one of: ``data_path`` (one blend split by ``split``), the per-split paths
    (``train_data_path``/``valid_data_path``/``test_data_path``, each its own blend), or
    ``mock_data``. A blend is Megatron's list: ``["a"]``, ``["a", "b"]`` (weighted by size) or
    ``["0.7", "a", "0.3", "b"]`` (weights, normalized); entries are ``.bin/.idx`` prefixes.
    """

    data_path: list[str] | None = None
    split: str | None = None  # e.g. "969,30,1"; DEFAULT_SPLIT when data_path is given
    train_data_path: list[str] | None = None
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    seq_length: int = 2048
    seed: int = 1234
    data_cache_path: str | None = None  # default: next to each dataset
    mock_data: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = True
    mmap_bin_files: bool = True
    num_dataset_builder_threads: int = 1

    def __post_init__(self) -> None:
        per_split = any(
            p for p in (self.train_data_path, self.valid_data_path, self.test_data_path)
        )
        sources = sum([bool(self.data_path), per_split, self.mock_data])
        if sources != 1:
            raise ValueError(
                "DataConfig needs exactly one of data_path, train/valid/test_data_path or "
                f"mock_data (got {sources})"
            )
        if per_split and self.split is not None:
            raise ValueError("split applies to data_path, not to train/valid/test_data_path")
        if self.data_path and self.split is None:
            self.split = DEFAULT_SPLIT
        if self.split is not None:
            parts = [p.strip() for p in self.split.replace("/", ",").split(",")]
            try:
                weights = [float(p) for p in parts]
            except ValueError:
                weights = []
            if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"split {self.split!r} must be 1-3 comma-separated non-negative numbers "
                    "with a positive sum, e.g. '969,30,1'"
                )
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {self.seq_length}")
        for blend in (self.data_path, self.train_data_path, self.valid_data_path,
                      self.test_data_path):
            if blend:
                parse_blend(blend)

    def blend(self) -> tuple[list[str], list[float] | None] | None:
        return parse_blend(self.data_path) if self.data_path else None

    def blend_per_split(self) -> list[tuple[list[str], list[float] | None] | None] | None:
        if not any((self.train_data_path, self.valid_data_path, self.test_data_path)):
            return None
        return [
            parse_blend(p) if p else None
            for p in (self.train_data_path, self.valid_data_path, self.test_data_path)
        ]

    def prefixes(self) -> list[str]:
        """Every dataset prefix this config reads, in order, without repeats."""
        out: list[str] = []
        blends = [self.blend()] + (self.blend_per_split() or [])
        for blend in blends:
            for prefix in blend[0] if blend else []:
                if prefix not in out:
                    out.append(prefix)
        return out


def parse_blend(entries: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's blend list -> (prefixes, weights or None). Raises ValueError when malformed."""
    entries = [str(e).strip() for e in entries]
    if not entries or any(not e for e in entries):
        raise ValueError(f"empty entry in data path list {list(entries)}")

    def as_float(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    numeric = [as_float(e) is not None for e in entries]
    if len(entries) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2]):
        weights = [as_float(w) for w in entries[0::2]]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"blend weights must be >= 0 and not all 0: {entries}")
        return list(entries[1::2]), weights
    if any(numeric):
        raise ValueError(
            f"data path list {entries} mixes weights and paths: give either only paths or "
            "'weight path' pairs"
        )
    return list(entries), None


def check_data_paths(config: DataConfig, tokenizer=None) -> None:
    """Raise DatasetPathError naming the first data path that cannot be trained on.

    With a ``tokenizer``, also refuse datasets made with another tokenizer (sidecar and token
    dtype, see ``provenance.check_datasets_tokenizer``). Reads headers and stats files only.
    """
    for prefix in config.prefixes():
        header = read_index_header(prefix)
        if header.is_sentence_level:
            raise DatasetPathError(
                f"data path {prefix!r} is sentence-level (several sequences per document, "
                "made with --split-sentences): GPTDataset would shuffle its sentences as "
                "separate documents; train on the _document dataset instead"
            )
        if header.num_documents == 0:
            raise DatasetPathError(f"data path {prefix!r} holds no documents")
    if tokenizer is not None:
        check_datasets_tokenizer(config.prefixes(), tokenizer)


@dataclass
class KeyedGPTDatasetConfig(gpt_dataset.GPTDatasetConfig):
    """megatron-core's config plus the data-file key of every dataset path (see GPTDataset)."""

    data_files: dict[str, dict] = field(default_factory=dict)


class GPTDataset(gpt_dataset.GPTDataset):
    """megatron-core's GPTDataset whose cached indices are keyed on its data files too.

    megatron-core names the cached document/sample/shuffle indices after a hash of the dataset
    path and the config, so a dataset regenerated at the same path would read indices built for
    the old files. Here the ``.bin/.idx`` size and modification time (``data_files`` of the
    config, taken on rank 0 so every rank names the same files) join that description.
    """

    def _build_document_sample_shuffle_indices(self):
        files = getattr(self.config, "data_files", {}).get(self.dataset_path)
        if files is None and self.dataset_path is not None:
            files = data_files_key(self.dataset_path)
        self.unique_identifiers["data_files"] = files
        self.unique_description = json.dumps(
            self.unique_identifiers, indent=4, default=lambda obj: obj.unique_identifiers
        )
        self.unique_description_hash = hashlib.md5(
            self.unique_description.encode("utf-8"), usedforsecurity=False
        ).hexdigest()
        return super()._build_document_sample_shuffle_indices()


def _data_files(config: DataConfig) -> dict[str, dict]:
    """Every dataset's file key, as rank 0 sees it when a process group exists."""
    import torch.distributed as dist

    keys = {prefix: data_files_key(prefix) for prefix in config.prefixes()}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [keys]
        dist.broadcast_object_list(box, src=0)
        keys = box[0]
    return keys


def _gpt_config(config: DataConfig, tokenizer, **blend_args):
    return KeyedGPTDatasetConfig(
        data_files=_data_files(config) if not config.mock_data else {},
        random_seed=config.seed,
        sequence_length=config.seq_length,
        path_to_cache=config.data_cache_path,
        mmap_bin_files=config.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.create_attention_mask,
        num_dataset_builder_threads=config.num_dataset_builder_threads,
        **blend_args,
    )


def _every_rank() -> bool:
    return True


@contextmanager
def _rank_zero_without_process_group() -> Iterator[None]:
    """Let megatron-core's BlendedDataset write its cache without a process group.

    megatron-core 0.16's ``BlendedDataset._build_indices`` calls ``torch.distributed.get_rank()``
    on a cache miss even when no process group exists (GPTDataset checks first). Without a
    process group this process is the only one, so it is rank 0 for the duration of the build.
    """
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def _checked_sizes(config: DataConfig, sizes: list[int | None]) -> list[int | None]:
    """Sizes megatron-core accepts: a split that gets no data needs no count (None -> 0);
    a weighted blend needs a count for every split it feeds."""
    names = ("train", "valid", "test")
    if config.mock_data:
        blends = [None, None, None]
    elif config.data_path:
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix,
            parse_and_normalize_split,
        )

        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(config.split))
        blends = [config.blend() if part is not None else None for part in matrix]
    else:
        blends = config.blend_per_split()
    out: list[int | None] = []
    for name, blend, size in zip(names, blends, sizes):
        if size is not None and size < 0:
            raise ValueError(f"{name}_samples must be >= 0, got {size}")
        if blend is None and not config.mock_data:
            size = 0 if size is None else size
        elif blend is not None and blend[1] is not None and size is None:
            raise ValueError(
                f"a weighted blend needs a {name} sample count ({name}_samples is None)"
            )
        out.append(size)
    return out


def build_gpt_datasets(
    config: DataConfig,
    tokenizer,
    train_samples: int | None,
    valid_samples: int | None,
    test_samples: int | None,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> SplitDatasets:
    """Build ``(train, valid, test)``; a split with no data (or not built here) is None.

    ``*_samples`` is the number of samples to draw (the dataset repeats epochs as needed);
    None means one epoch, allowed only for unweighted blends. ``tokenizer`` is one of
    ``megatron_latent.data.tokenizers`` (needs ``eod`` and ``vocab_size``). Must be called
    on every rank when torch.distributed is initialized.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    sizes = _checked_sizes(config, [train_samples, valid_samples, test_samples])
    if config.mock_data:
        gpt_config = _gpt_config(config, tokenizer, split=config.split)
        cls = gpt_dataset.MockGPTDataset
    else:
        check_data_paths(config, tokenizer)
        gpt_config = _gpt_config(
            config,
            tokenizer,
            blend=config.blend(),
            blend_per_split=config.blend_per_split(),
            split=config.split,
        )
        cls = GPTDataset
    builder = BlendedMegatronDatasetBuilder(
        cls, sizes, is_built_on_rank or _every_rank, gpt_config
    )
    with _rank_zero_without_process_group():
        train, valid, test = builder.build()
    return train, valid, test


def build_valid_datasets_per_component(
    config: DataConfig,
    tokenizer,
    valid_samples: int | None,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> list[tuple[str, object | None]]:
    """One validation dataset per blend component, for a loss per dataset.

    With ``data_path`` each component's validation part (per ``split``) is exactly the
    documents that component contributes to the blended validation split; with
    ``valid_data_path`` each listed dataset is used whole. Weights are ignored: every
    component gets ``valid_samples`` samples (None: one full epoch). Returns
    ``[(prefix, dataset)]`` (``[("mock", dataset)]`` with mock data).
    """
    if config.mock_data:
        return [("mock", build_gpt_datasets(config, tokenizer, None, valid_samples, None,
                                            is_built_on_rank)[1])]
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    if config.data_path:
        prefixes = config.blend()[0]
    elif config.valid_data_path:
        prefixes = parse_blend(config.valid_data_path)[0]
    else:
        raise ValueError("no validation data: give data_path or valid_data_path")
    check_data_paths(config, tokenizer)
    out: list[tuple[str, object | None]] = []
    for prefix in prefixes:
        if config.data_path:
            gpt_config = _gpt_config(config, tokenizer, blend=([prefix], None), split=config.split)
            valid_part = gpt_config.split_matrix[1]
            if valid_part is None:
                raise ValueError(f"split {config.split!r} leaves no data for validation")
            gpt_config.split_matrix = [None, valid_part, None]
        else:
            gpt_config = _gpt_config(
                config, tokenizer, blend_per_split=[None, ([prefix], None), None]
            )
        builder = BlendedMegatronDatasetBuilder(
            GPTDataset, [None, valid_samples, None], is_built_on_rank or _every_rank, gpt_config
        )
        with _rank_zero_without_process_group():
            out.append((prefix, builder.build()[1]))
    return out
