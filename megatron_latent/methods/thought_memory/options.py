"""Thought memory's flags, its run-level options and the architecture change it needs (four
special ids after the tokenizer's vocabulary, rows of L sentence-local positions)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ...config import ConfigError, ModelConfig
from . import streams
from .model import LOSS_MODES, ThoughtMemoryOptions

#: PAD, BOS, EOS, EOD (streams.special_token_ids).
NUM_SPECIAL_IDS = 4

PIPELINE_REFUSAL = (
    "--method thought-memory does not support pipeline parallelism "
    "(--pipeline-model-parallel-size must be 1): every sentence row runs the whole stack and "
    "its vector feeds the next row's first layer. Use tensor parallelism to split the model."
)


@dataclass(frozen=True)
class ThoughtMemoryRunOptions:
    """Everything `--method thought-memory` reads from the command line."""

    model: ThoughtMemoryOptions
    max_content: int = streams.MAX_CONTENT
    row_length: int | None = None
    stream_length: int = streams.BASE_STREAM_LENGTH
    stream_length_step: int = streams.STREAM_LENGTH_STEP
    stream_length_every: int = streams.EPOCHS_PER_STEP
    stream_length_cap: int | None = None
    eos_weight: float = streams.EOS_WEIGHT_FIRST
    eos_weight_after: float = streams.EOS_WEIGHT_AFTER
    eos_weight_epochs: int = 1
    #: Map consumed tokens onto schedule epochs for the EOS weight (single-epoch runs);
    #: None keys it to passes over the training documents.
    schedule_epoch_tokens: int | None = None
    token_budget: int = streams.TOKEN_BUDGET
    pack_window: int = 1024

    @property
    def L(self) -> int:
        return self.row_length if self.row_length is not None else self.max_content + 3

    def validate(self) -> None:
        checks = [
            ("--tm-max-content", self.max_content, 1), ("--tm-stream-length", self.stream_length, 1),
            ("--tm-stream-length-step", self.stream_length_step, 0),
            ("--tm-stream-length-every", self.stream_length_every, 1),
            ("--tm-token-budget", self.token_budget, 1), ("--tm-pack-window", self.pack_window, 1),
            ("--tm-eos-weight-epochs", self.eos_weight_epochs, 0),
            ("--tm-memory-size", self.model.memory_size, 1),
        ]
        for flag, value, least in checks:
            if value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if self.row_length is not None and self.row_length < self.max_content + 2:
            raise ConfigError(f"--tm-row-length {self.row_length} must be >= --tm-max-content + 2 "
                              f"({self.max_content + 2})")
        if self.stream_length_cap is not None and self.stream_length_cap < 1:
            raise ConfigError(f"--tm-stream-length-cap must be >= 1, got {self.stream_length_cap}")
        if self.schedule_epoch_tokens is not None and self.schedule_epoch_tokens < 1:
            raise ConfigError("--tm-schedule-epoch-tokens must be >= 1, got "
                              f"{self.schedule_epoch_tokens}")
        for flag, weight in (("--tm-eos-weight", self.eos_weight),
                             ("--tm-eos-weight-after", self.eos_weight_after)):
            if weight < 0:
                raise ConfigError(f"{flag} must be >= 0, got {weight}")

    def layout(self, token_vocab_size: int, max_sentences: int | None = None
               ) -> streams.StreamLayout:
        """The row layout for a tokenizer of `token_vocab_size` ids."""
        return streams.StreamLayout.for_vocab(
            token_vocab_size, max_content=self.max_content,
            max_sentences=max_sentences or self.stream_length, row_length=self.L)

    def stream_length_at(self, epoch: int) -> int:
        return streams.stream_length_at(epoch=epoch, base=self.stream_length,
                                        step=self.stream_length_step,
                                        every=self.stream_length_every,
                                        cap=self.stream_length_cap)

    def eos_weight_at(self, epoch: int, consumed_tokens: int) -> float:
        if self.schedule_epoch_tokens is not None:
            return streams.eos_weight_at(tokens=consumed_tokens,
                                         tokens_per_epoch=self.schedule_epoch_tokens,
                                         first=self.eos_weight, after=self.eos_weight_after,
                                         first_epochs=self.eos_weight_epochs)
        return streams.eos_weight_at(epoch=epoch, first=self.eos_weight,
                                     after=self.eos_weight_after,
                                     first_epochs=self.eos_weight_epochs)


def add_thought_memory_arguments(group: argparse._ArgumentGroup) -> None:
    """The thought-memory flags (only read when --method thought-memory)."""
    d = ThoughtMemoryRunOptions(ThoughtMemoryOptions(eos_id=-1))
    m = d.model
    add = group.add_argument
    add("--tm-memory-size", type=int, default=m.memory_size,
        help="sentence vectors kept in the FIFO memory (M)")
    add("--tm-layer-pattern", default=None,
        help="one letter per layer: S (self-attention) or C (cross-attention to memory); "
             "default alternates SCSC...")
    add("--tm-source-layer", type=int, default=None,
        help="0-based layer whose output at EOS gives the sentence vector; default: the S "
             "layer at or after num_layers/2")
    add("--tm-newest-first", action="store_true",
        help="memory slot 0 is the newest vector (default: the oldest present)")
    add("--tm-hinge-weight", type=float, default=m.hinge_weight,
        help="weight of the sentence-vector norm hinge")
    add("--tm-s-rep-dropout", type=float, default=m.s_rep_dropout,
        help="dropout inside the sentence-vector head")
    add("--tm-loss-mode", choices=LOSS_MODES, default=m.loss_mode,
        help="paper: every sentence index weighs the same (its rows' EOS-weighted mean); "
             "token_mean: every weighted target weighs the same")
    add("--tm-max-content", type=int, default=d.max_content,
        help="content tokens per sentence row; longer sentences become several rows")
    add("--tm-row-length", type=int, default=None,
        help="row length L (default max content + 3: BOS, EOD, EOS always fit)")
    add("--tm-stream-length", type=int, default=d.stream_length,
        help="sentences per training stream S in the first curriculum phase")
    add("--tm-stream-length-step", type=int, default=d.stream_length_step,
        help="S grows by this much every --tm-stream-length-every epochs")
    add("--tm-stream-length-every", type=int, default=d.stream_length_every,
        help="epochs (passes over the training documents) per curriculum phase")
    add("--tm-stream-length-cap", type=int, default=None, help="largest S (default: none)")
    add("--tm-eos-weight", type=float, default=d.eos_weight,
        help="loss weight of EOS targets during the first --tm-eos-weight-epochs epochs")
    add("--tm-eos-weight-after", type=float, default=d.eos_weight_after,
        help="loss weight of EOS targets afterwards")
    add("--tm-eos-weight-epochs", type=int, default=d.eos_weight_epochs,
        help="epochs with the first EOS weight")
    add("--tm-schedule-epoch-tokens", type=int, default=None,
        help="key the EOS-weight schedule to consumed tokens (this many per epoch) instead of "
             "passes over the data (single-epoch runs)")
    add("--tm-token-budget", type=int, default=d.token_budget,
        help="non-pad tokens per global batch (streams are packed up to it; replaces "
             "--global-batch-size for this method)")
    add("--tm-pack-window", type=int, default=d.pack_window,
        help="streams sorted and packed together (larger: less padding, less shuffling)")


def thought_memory_options_from_args(args: argparse.Namespace) -> ThoughtMemoryRunOptions:
    model = ThoughtMemoryOptions(
        eos_id=-1,  # resolved from the vocabulary when the model is built
        memory_size=args.tm_memory_size, layer_pattern=args.tm_layer_pattern,
        source_layer=args.tm_source_layer, newest_first=args.tm_newest_first,
        hinge_weight=args.tm_hinge_weight, s_rep_dropout=args.tm_s_rep_dropout,
        loss_mode=args.tm_loss_mode)
    options = ThoughtMemoryRunOptions(
        model=model, max_content=args.tm_max_content, row_length=args.tm_row_length,
        stream_length=args.tm_stream_length, stream_length_step=args.tm_stream_length_step,
        stream_length_every=args.tm_stream_length_every,
        stream_length_cap=args.tm_stream_length_cap, eos_weight=args.tm_eos_weight,
        eos_weight_after=args.tm_eos_weight_after, eos_weight_epochs=args.tm_eos_weight_epochs,
        schedule_epoch_tokens=args.tm_schedule_epoch_tokens, token_budget=args.tm_token_budget,
        pack_window=args.tm_pack_window)
    options.validate()
    return options


def prepare_thought_memory_config(config: ModelConfig,
                                  options: ThoughtMemoryRunOptions | None) -> ModelConfig:
    """Four special ids after the vocabulary and rows of L positions. Idempotent."""
    options = options or ThoughtMemoryRunOptions(ThoughtMemoryOptions(eos_id=-1))
    return config.replace(extra_vocab=NUM_SPECIAL_IDS, seq_length=options.L,
                          max_position_embeddings=options.L)


def layout_for_model(model_config: ModelConfig, options: ThoughtMemoryRunOptions
                     ) -> streams.StreamLayout:
    """The row layout of a prepared model config (its vocab_size is the tokenizer's)."""
    if model_config.extra_vocab < NUM_SPECIAL_IDS:
        raise ConfigError("the model config has no room for thought memory's special ids "
                          "(prepare it with prepare_thought_memory_config)")
    return options.layout(model_config.vocab_size)
