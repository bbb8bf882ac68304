"""The trainer's thought-memory data: sentence streams from a ``--split-sentences`` dataset.

The source is one sentence-level dataset (``--data-path PREFIX``, its documents split into
train/validation/test by ``--split``, in order) or ``--train-data-path`` and
``--valid-data-path`` (one prefix each). Training walks epochs; epoch ``e`` cuts the training
documents into streams of ``S(e)`` sentences (the curriculum) and packs them with seed
``seed + e`` (streams.StreamBatcher). A resumed run finds its place from the consumed streams
(the trainer's consumed-samples counter counts streams for this method).

Every rank builds the whole global batch (cheap: a few thousand rows) so the loss weights are
normalised over the whole global batch (streams.stream_token_weights, decision 8); it keeps
the streams at positions ``rank, rank + D, ...`` of the longest-first order and splits them
into micro-batches of at most --micro-batch-size streams, the same count on every rank (a
rank with nothing left gets one empty row with zero weight). The engine divides by the global
sum of the weights: the number of sentence indices in "paper" mode, so the logged loss is the
mean over indices of the paper's index losses (the paper sums them), 1 in "token_mean" mode.

Validation documents are never cut. Two sets are scored on the first --eval-iters packed
batches: ``validation`` counts content targets only (no PAD/BOS/EOS/EOD: the paper's
perplexity, comparable with a vanilla model scored on the same content tokens) and
``all-targets`` every non-pad target (EOS and EOD included, the official code's perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core import parallel_state

from ...config import ConfigError
from ...data.datasets import parse_blend
from ...data.indexed import DatasetPathError, read_index_header
from ...training.data import StepBatch
from .model import stream_token_weights
from .options import ThoughtMemoryRunOptions
from .streams import SentenceRows, StreamBatch, StreamBatcher, StreamLayout

ALL_TARGETS = "all-targets"


def source_prefixes(run) -> tuple[str, str | None]:
    """(training source, validation source or None when --split divides one dataset)."""
    data = run.data
    if data.mock_data:
        raise ConfigError("--method thought-memory trains on sentence streams: give --data-path "
                          "PREFIX of a dataset made with tools/preprocess_data.py "
                          "--split-sentences (--mock-data has no sentences)")
    try:
        if data.data_path:
            prefixes, _ = parse_blend(data.data_path)
            if len(prefixes) != 1:
                raise ConfigError("--method thought-memory reads one sentence dataset: give "
                                  f"--data-path one prefix, got {list(data.data_path)}")
            return prefixes[0], None
        if data.train_data_path and data.valid_data_path:
            train, _ = parse_blend(data.train_data_path)
            valid, _ = parse_blend(data.valid_data_path)
            if len(train) != 1 or len(valid) != 1:
                raise ConfigError("--method thought-memory: give one prefix each to "
                                  "--train-data-path and --valid-data-path")
            return train[0], valid[0]
    except ValueError as error:
        raise ConfigError(f"data flags: {error}") from error
    raise ConfigError("--method thought-memory needs --data-path PREFIX (split by --split) or "
                      "--train-data-path and --valid-data-path")


def check_thought_memory_data(run) -> None:
    """Refuse (naming the path) sources that are missing, unreadable or not sentence-level."""
    train, valid = source_prefixes(run)
    for prefix in (train, valid):
        if prefix is None:
            continue
        try:
            header = read_index_header(prefix)
        except DatasetPathError as error:
            raise ConfigError(str(error)) from error
        if not header.is_sentence_level:
            raise ConfigError(
                f"data path {prefix!r} is document-level (one sequence per document); "
                "--method thought-memory needs the _sentence dataset that "
                "tools/preprocess_data.py --split-sentences writes")
    from ...data.provenance import check_datasets_tokenizer
    from ...data.tokenizers import TokenizerError
    from ...training.data import build_run_tokenizer

    try:
        check_datasets_tokenizer([p for p in (train, valid) if p], build_run_tokenizer(run))
    except (DatasetPathError, TokenizerError) as error:
        raise ConfigError(str(error)) from error


def select_documents(rows: SentenceRows, start: int, stop: int) -> SentenceRows:
    """The rows of kept documents ``start .. stop - 1`` (a view over the same dataset)."""
    first, last = int(rows.doc_rows[start]), int(rows.doc_rows[stop])
    return SentenceRows(dataset=rows.dataset, sequence=rows.sequence[first:last],
                        offset=rows.offset[first:last], length=rows.length[first:last],
                        doc_rows=rows.doc_rows[start:stop + 1] - first,
                        documents_read=stop - start, documents_dropped=0)


def split_documents(rows: SentenceRows, split: str) -> tuple[SentenceRows, SentenceRows]:
    """(train, validation) documents by --split proportions, in document order, cut where
    megatron-core cuts a dataset's documents for the same --split."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (ValueError, AssertionError) as error:
        raise ConfigError(f"--split {split!r}: {error}") from error
    n = rows.num_documents
    parts = []
    for part in matrix[:2]:
        begin, end = part if part is not None else (0.0, 0.0)
        parts.append(select_documents(rows, int(round(begin * n)), int(round(end * n))))
    return parts[0], parts[1]


def thought_memory_model_inputs(batch: dict[str, torch.Tensor], device: torch.device
                                ) -> dict[str, torch.Tensor]:
    """ThoughtMemoryModel keyword arguments of one micro-batch (weights are the loss mask)."""
    inputs = {"input_ids": batch["tokens"].to(device, non_blocking=True),
              "targets": batch["labels"].to(device, non_blocking=True),
              "valid": batch["valid"].to(device, non_blocking=True)}
    if "hinge_rows" in batch:
        inputs["hinge_rows"] = batch["hinge_rows"].to(device, non_blocking=True)
    return inputs


def hinge_row_weights(valid: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] weights for the sentence-vector hinge of each row of a whole global batch:
    (Σ loss_mask / T_eff) / (valid rows at t), so that after the engine divides by Σ loss_mask
    the hinge is the mean over the T_eff sentence indices of each index's mean over its rows
    (the index losses are averaged the same way)."""
    rows_at = valid.sum(dim=0, keepdim=True).to(torch.float64)  # [1, T]
    indices = (loss_mask.sum(dim=(0, 2)) > 0).sum().clamp(min=1).to(torch.float64)
    scale = loss_mask.to(torch.float64).sum() / indices
    weights = torch.where(rows_at > 0, scale / rows_at.clamp(min=1), 0.0) * valid
    return weights.to(torch.float32)


def _chunks(count: int, dp_rank: int, dp_size: int, per_microbatch: int
            ) -> tuple[list[list[int]], int]:
    """This rank's micro-batches as positions into the longest-first global batch, and the
    rows every rank together executes (empty micro-batches run one dummy row)."""
    per_rank = math.ceil(count / dp_size)
    num = max(1, math.ceil(per_rank / per_microbatch))
    rows_executed = 0
    mine: list[list[int]] = []
    for rank in range(dp_size):
        positions = list(range(rank, count, dp_size))
        pieces = [positions[i * per_microbatch:(i + 1) * per_microbatch] for i in range(num)]
        rows_executed += sum(max(len(piece), 1) for piece in pieces)
        if rank == dp_rank:
            mine = pieces
    return mine, rows_executed


def _microbatch(whole: StreamBatch, positions: list[int], masks: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    if not positions:  # one empty row: shapes agree across ranks, nothing is learned from it
        t, length = whole.input_ids.shape[1:]
        pad = int(whole.targets[0, 0, -1])  # the final slot of any row is PAD
        return {"tokens": torch.full((1, t, length), pad, dtype=torch.long),
                "labels": torch.full((1, t, length), pad, dtype=torch.long),
                "valid": torch.zeros(1, t, dtype=torch.bool),
                **{key: torch.zeros((1, *mask.shape[1:])) for key, mask in masks.items()}}
    index = torch.tensor(positions)
    return {"tokens": whole.input_ids[index], "labels": whole.targets[index],
            "valid": whole.valid[index], **{key: mask[index] for key, mask in masks.items()}}


class ThoughtMemoryData:
    """Training steps and validation micro-batches of one run, on this rank."""

    def __init__(self, run, tokenizer, options: ThoughtMemoryRunOptions, consumed_streams: int,
                 consumed_tokens: int, total_iters: int):
        self.run, self.options = run, options
        self.token_vocab = int(tokenizer.vocab_size)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.seed = run.training.seed
        train_prefix, valid_prefix = source_prefixes(run)
        eod = getattr(tokenizer, "eod", None)
        train_rows = SentenceRows.from_dataset(train_prefix, options.max_content, eod_id=eod)
        if valid_prefix is None:
            self.train_rows, self.valid_rows = split_documents(train_rows, run.data.split)
        else:
            self.train_rows = train_rows
            self.valid_rows = SentenceRows.from_dataset(valid_prefix, options.max_content,
                                                        eod_id=eod)
        if self.train_rows.num_documents == 0:
            raise ConfigError(f"{train_prefix!r}: no training document with two or more "
                              "sentences (check --split)")
        self.consumed_streams, self.consumed_tokens = consumed_streams, consumed_tokens
        self._epoch_batcher: tuple[int, StreamBatcher] | None = None
        self._validation: list[tuple[str, list[dict[str, torch.Tensor]]]] | None = None

    # -- training ------------------------------------------------------------------------
    def layout(self, max_sentences: int) -> StreamLayout:
        return self.options.layout(self.token_vocab, max_sentences=max_sentences)

    def batcher(self, epoch: int) -> StreamBatcher:
        """Epoch `epoch`'s packed global batches (S from the curriculum, seed + epoch)."""
        if self._epoch_batcher is None or self._epoch_batcher[0] != epoch:
            layout = self.layout(self.options.stream_length_at(epoch))
            batcher = StreamBatcher(self.train_rows, layout, seed=self.seed + epoch,
                                    token_budget=self.options.token_budget, cut=True,
                                    window=self.options.pack_window)
            self._epoch_batcher = (epoch, batcher)
        return self._epoch_batcher[1]

    def position(self, consumed_streams: int) -> tuple[int, int]:
        """(epoch, global batch index) after `consumed_streams` streams."""
        epoch, left = 0, consumed_streams
        while left >= len(self.batcher(epoch).streams):
            left -= len(self.batcher(epoch).streams)
            epoch += 1
        try:
            return epoch, self.batcher(epoch).batches_for_consumed_streams(left)
        except ValueError as error:
            raise ConfigError(f"resuming thought-memory data: {error} (was the checkpoint "
                              "written with other data or --tm-* stream flags?)") from error

    def step(self, batcher: StreamBatcher, index: int, eos_weight: float) -> StepBatch:
        """Global batch `index` of `batcher`: this rank's micro-batches and its consumption."""
        whole = batcher.batch(index, eos_weight, 0, 1)
        weights = stream_token_weights(whole.weights, whole.valid, self.options.model.loss_mode)
        hinge = hinge_row_weights(whole.valid, weights)
        pieces, rows = _chunks(len(whole.stream_ids), self.dp_rank, self.dp_size,
                               self.run.training.micro_batch_size)
        microbatches = [_microbatch(whole, piece, {"loss_mask": weights, "hinge_rows": hinge})
                        for piece in pieces]
        slots = rows * whole.input_ids.shape[1] * whole.input_ids.shape[2]
        return StepBatch(microbatches, samples=whole.global_streams, tokens=whole.global_tokens,
                         flop_tokens=slots)

    def train_steps(self) -> Iterator[StepBatch]:
        epoch, index = self.position(self.consumed_streams)
        tokens = self.consumed_tokens
        while True:
            batcher = self.batcher(epoch)
            while index < len(batcher):
                step = self.step(batcher, index, self.options.eos_weight_at(epoch, tokens))
                tokens += step.tokens
                index += 1
                yield step
            epoch, index = epoch + 1, 0

    # -- validation ----------------------------------------------------------------------
    def validation(self) -> list[tuple[str, list[dict[str, torch.Tensor]]]]:
        """[("validation", content targets), ("all-targets", every non-pad target)], the
        first --eval-iters packed batches of the uncut validation documents (built once)."""
        if self._validation is None:
            self._validation = self._build_validation()
        return self._validation

    def _build_validation(self) -> list[tuple[str, list[dict[str, torch.Tensor]]]]:
        iters = self.run.evaluation.eval_iters
        if not iters or self.valid_rows.num_documents == 0:
            return []
        layout = self.layout(self.options.stream_length)
        batcher = StreamBatcher(self.valid_rows, layout, seed=self.seed,
                                token_budget=self.options.token_budget, cut=False,
                                window=self.options.pack_window)
        content, every = [], []
        for index in range(min(iters, len(batcher))):
            whole = batcher.batch(index, 1.0, 0, 1)
            real = (whole.weights > 0) & whole.valid[..., None]
            masks = {"content": (real & (whole.targets < self.token_vocab)).float(),
                     "every": real.float()}
            pieces, _ = _chunks(len(whole.stream_ids), self.dp_rank, self.dp_size,
                                self.run.training.micro_batch_size)
            for piece in pieces:
                micro = _microbatch(whole, piece, masks)
                content.append({**micro, "loss_mask": micro["content"]})
                every.append({**micro, "loss_mask": micro["every"]})
        return [("validation", content), (ALL_TARGETS, every)]


def build_thought_memory_data(run, tokenizer, options: ThoughtMemoryRunOptions,
                              consumed_samples: int, consumed_tokens: int,
                              total_iters: int) -> Any:
    """MethodSpec.build_data for thought memory (see the module doc)."""
    return ThoughtMemoryData(run, tokenizer, options, consumed_samples, consumed_tokens,
                             total_iters)
