"""The trainer's view of data: tokenizer, datasets and per-rank loaders for one run.

Training samples are drawn in Megatron's order from `consumed_samples` on, so a resumed run
continues exactly. Validation always reads the same first `eval_iters x global_batch` samples
of each validation set, so every evaluation (and every method) is scored on identical tokens.

The loop sees any method's data through two calls (`RunData` here for Megatron GPT datasets;
a method with its own data, `MethodSpec.build_data`, returns an object with the same two):

- ``train_steps()``: the optimizer steps from the resume point on, each a `StepBatch` (this
  rank's micro-batches, the same number on every data-parallel rank, and what the whole global
  batch consumed);
- ``validation()``: ``[(name, this rank's micro-batches)]``, the same slice at every evaluation.

A micro-batch is a dict the engine hands to `MethodSpec.model_inputs` and whose ``loss_mask``
weighs the model's per-token loss; the optimised loss is Σ loss × loss_mask / Σ loss_mask over
the global batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state

from ..config import ConfigError
from ..data.datasets import (
    DataConfig,
    build_gpt_datasets,
    build_valid_datasets_per_component,
    check_data_paths,
    parse_blend,
)
from ..data.indexed import DatasetPathError
from ..data.samplers import build_pretraining_data_loader
from .config import RunConfig


def build_run_tokenizer(run: RunConfig):
    """The run's tokenizer; with --mock-data and no tokenizer, megatron's NullTokenizer sized
    to the model's vocabulary."""
    settings = run.tokenizer
    if settings.tokenizer_type is None:
        if not run.data.mock_data:
            raise ConfigError("--tokenizer-type (and its model/vocab files) is required "
                              "unless --mock-data is given")
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        return NullTokenizer(run.model.vocab_size - 1)  # ids 0..V-2, eod = V-1
    from ..data.tokenizers import build_tokenizer

    return build_tokenizer(
        settings.tokenizer_type,
        tokenizer_model=settings.tokenizer_model,
        vocab_file=settings.vocab_file,
        merge_file=settings.merge_file,
    )


def data_config(run: RunConfig) -> DataConfig:
    """megatron_latent.data's DataConfig from the run's Megatron-style data flags."""
    data = run.data
    try:
        return DataConfig(
            data_path=data.data_path,
            split=data.split if data.data_path else None,
            train_data_path=data.train_data_path,
            valid_data_path=data.valid_data_path,
            test_data_path=data.test_data_path,
            seq_length=run.model.seq_length,
            seed=run.training.seed,
            data_cache_path=data.data_cache_path,
            mock_data=data.mock_data,
            reset_position_ids=data.reset_position_ids,
            reset_attention_mask=data.reset_attention_mask,
            eod_mask_loss=data.eod_mask_loss,
            create_attention_mask=data.reset_attention_mask,
        )
    except ValueError as error:
        raise ConfigError(f"data flags: {error}") from error


def check_data(run: RunConfig) -> None:
    """Fail fast (before any model is built) on missing or unusable data paths.

    Checks every dataset's files (present, readable, sizes that agree with its index) and then
    that it was made with the run's tokenizer (its tokenizer sidecar, and its token dtype
    against the vocabulary size). Reads headers and stats files only.
    """
    config = data_config(run)
    if config.mock_data:
        return
    from ..data.tokenizers import TokenizerError

    try:
        check_data_paths(config)
        tokenizer = build_run_tokenizer(run)
        check_data_paths(config, tokenizer)
    except (DatasetPathError, TokenizerError) as error:
        raise ConfigError(str(error)) from error


@dataclass
class StepBatch:
    """One optimizer step's data on this rank, with the global batch's consumption."""

    microbatches: list[dict[str, torch.Tensor]]
    #: samples of the global batch (the resume counter: sequences, or a method's units)
    samples: int
    #: training tokens of the global batch (non-padding)
    tokens: int
    #: token positions the model executes for the global batch (what FLOPs per token count)
    flop_tokens: int


@dataclass
class RunData:
    """Megatron GPT datasets: the train loader and the validation datasets."""

    run: RunConfig
    train_loader: Any
    valid_sets: list[tuple[str, Any]]

    def train_steps(self) -> Iterator[StepBatch]:
        global_batch = self.run.training.global_batch_size
        tokens = global_batch * self.run.model.seq_length
        num_microbatches = self.run.training.num_microbatches(
            parallel_state.get_data_parallel_world_size())
        for group in microbatch_groups(self.train_loader, num_microbatches):
            yield StepBatch(group, global_batch, tokens, tokens)

    def validation(self) -> list[tuple[str, list[dict[str, torch.Tensor]]]]:
        return [(name, valid_batches(self.run, dataset)) for name, dataset in self.valid_sets]


def build_run_datasets(run: RunConfig, tokenizer, total_iters: int
                       ) -> tuple[Any, list[tuple[str, Any]]]:
    """The run's training dataset and its validation sets: ``("validation", blend)`` and, for
    a blend of several datasets, ``(prefix, dataset)`` per component (none without
    --eval-iters). Shared by training and by anything that must score the same slice."""
    config = data_config(run)
    global_batch = run.training.global_batch_size
    train_samples = total_iters * global_batch
    valid_samples = run.evaluation.eval_iters * global_batch if run.evaluation.eval_iters else 0
    try:
        train, valid, _ = build_gpt_datasets(config, tokenizer, train_samples,
                                             valid_samples, None)
        valid_sets: list[tuple[str, Any]] = []
        if valid_samples and valid is not None:
            valid_sets.append(("validation", valid))
            if config.mock_data:
                components = []
            elif config.data_path:
                components = config.blend()[0]
            else:
                components = parse_blend(config.valid_data_path or [])[0] if \
                    config.valid_data_path else []
            if len(components) > 1:
                for prefix, dataset in build_valid_datasets_per_component(config, tokenizer,
                                                                          valid_samples):
                    if dataset is not None:
                        valid_sets.append((prefix, dataset))
    except (ValueError, DatasetPathError) as error:
        raise ConfigError(f"building datasets: {error}") from error
    return train, valid_sets


def build_run_data(run: RunConfig, tokenizer, consumed_samples: int, total_iters: int,
                   wrap: Callable[[Any], Any] | None = None) -> RunData:
    """Datasets for the whole run and the train loader positioned at `consumed_samples`;
    `wrap` (a method's) replaces each dataset, training and validation, by one of its own
    with the same samples (e.g. with labels beside the tokens)."""
    train, valid_sets = build_run_datasets(run, tokenizer, total_iters)
    if train is None:
        raise ConfigError("the data flags give no training split (check --split)")
    if wrap is not None:
        train = wrap(train)
        valid_sets = [(name, wrap(dataset)) for name, dataset in valid_sets]
    loader = build_pretraining_data_loader(
        train,
        consumed_samples=consumed_samples,
        micro_batch_size=run.training.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        num_workers=run.training.num_workers,
        seed=run.training.seed,
    )
    return RunData(run=run, train_loader=loader, valid_sets=valid_sets)


def valid_batches(run: RunConfig, dataset) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the fixed validation slice (eval_iters global batches)."""
    loader = build_pretraining_data_loader(
        dataset,
        consumed_samples=0,
        micro_batch_size=run.training.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        num_workers=0,
        seed=run.training.seed,
    )
    per_rank = (run.evaluation.eval_iters * run.training.global_batch_size
                // (run.training.micro_batch_size
                    * parallel_state.get_data_parallel_world_size()))
    return list(itertools.islice(iter(loader), per_rank))


def microbatch_groups(loader, num_microbatches: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Group a rank's micro-batch stream into optimizer steps."""
    iterator = iter(loader)
    while True:
        group = list(itertools.islice(iterator, num_microbatches))
        if len(group) < num_microbatches:
            return
        yield group
