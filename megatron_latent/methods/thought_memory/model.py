"""The thought-memory model (../shared/methods/thought_gestalt.md, "Model", "Loss", decisions
4-9): a Pythia stack of S layers (causal self-attention within one sentence row) and C layers
(gated cross-attention to a FIFO memory of sentence vectors), run sentence by sentence over a
stream batch (streams.py's StreamBatch tensors).

Loss aggregation (decision 8) is expressed as per-token weights (`stream_token_weights`):
``"paper"`` (default, paper/code parity): for each sentence index t, Σ w·CE / Σ w over the
batch's rows at t, summed over t; ``"token_mean"``: Σ w·CE / Σ w over the whole batch. The
model returns CE already multiplied by these weights, so its sum is the LM part of the loss;
the S_REP hinge (summed over t, as in the paper's index losses) comes in `aux`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from torch import Tensor

from ...config import ConfigError, ModelConfig
from ...models.language_model import PythiaModel
from ...models.specs import block_spec, layer_spec
from .layers import FifoMemory, SentenceVectorHead, gated_cross_attention_layer_spec

LOSS_MODES = ("paper", "token_mean")


def default_layer_pattern(num_layers: int) -> str:
    """Alternating S, C starting with S: ``"SC" * (L / 2)`` (layer 0 = S, the last = C)."""
    return ("SC" * num_layers)[:num_layers]


def default_source_layer(pattern: str) -> int:
    """0-based L/2, rounded up to an S layer (down when no S layer follows)."""
    middle = len(pattern) // 2
    later = [i for i in range(middle, len(pattern)) if pattern[i] == "S"]
    earlier = [i for i in range(middle - 1, -1, -1) if pattern[i] == "S"]
    if not later and not earlier:
        raise ConfigError("the layer pattern has no S layer")
    return (later or earlier)[0]


@dataclass
class ThoughtMemoryOptions:
    """Method options. `eos_id` is the row-closing EOS id (streams.StreamLayout.eos)."""

    eos_id: int
    memory_size: int = 40
    layer_pattern: str | None = None  # e.g. "SCSC"; None: default_layer_pattern
    source_layer: int | None = None  # S_REP source (0-based); None: default_source_layer
    newest_first: bool = False
    hinge_weight: float = 0.01
    s_rep_dropout: float = 0.0
    loss_mode: str = "paper"

    def resolved(self, num_layers: int) -> tuple[str, int]:
        """(layer pattern, source layer), validated for `num_layers` layers."""
        pattern = (self.layer_pattern or default_layer_pattern(num_layers)).upper()
        if len(pattern) != num_layers or set(pattern) - {"S", "C"}:
            raise ConfigError(f"layer pattern {pattern!r} must be {num_layers} letters S/C")
        source = default_source_layer(pattern) if self.source_layer is None else self.source_layer
        if not 0 <= source < num_layers:
            raise ConfigError(f"S_REP source layer {source} not in [0, {num_layers})")
        if self.memory_size < 1:
            raise ConfigError(f"memory size must be >= 1, got {self.memory_size}")
        if self.loss_mode not in LOSS_MODES:
            raise ConfigError(f"loss mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        return pattern, source


def stream_token_weights(weights: Tensor, valid: Tensor, mode: str = "paper") -> Tensor:
    """Per-token weights [B, T, L] whose dot product with CE is the decision-8 aggregate.

    paper: w / Σ_{rows at t} w for each sentence index t (indices with Σ w = 0 get 0);
    token_mean: w / Σ w. Rows not `valid` [B, T] get 0. The sums are over this batch only
    (under data parallelism the denominators must be all-reduced first).
    """
    w = weights * valid[..., None].to(weights.dtype)
    if mode == "paper":
        total = w.sum(dim=(0, 2), keepdim=True)
    elif mode == "token_mean":
        total = w.sum().reshape(1, 1, 1)
    else:
        raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    return torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), 0.0)


def stream_loss(per_token_ce: Tensor, weights: Tensor, valid: Tensor,
                mode: str = "paper") -> Tensor:
    """The decision-8 LM loss (scalar) of per-token CE [B, T, L] (hinge not included)."""
    return (per_token_ce * stream_token_weights(weights, valid, mode)).sum()


class ThoughtMemoryModel(PythiaModel):
    """PythiaModel whose decoder follows an S/C layer pattern and reads a sentence memory.

    The decoder is one TransformerBlock built from a per-layer spec list (checkpoint names
    `decoder.layers.i.*`); `forward` drives its layers itself so it can read the residual
    stream after the S_REP source layer. S layers ignore the memory (`context`); C layers get
    it as `context` [M, B, h] and the filled-slot counts as `context_mask` [B]. TP=1 is tested;
    sequence parallelism, pipeline stages and full recompute are refused.
    """

    memory_class: type[FifoMemory] = FifoMemory

    def __init__(self, config, model_config: ModelConfig, options: ThoughtMemoryOptions,
                 transformer_impl: str = "local", attention: str = "sdpa", **kwargs):
        if config.pipeline_model_parallel_size != 1:
            raise ConfigError("thought-memory: no pipeline parallelism")
        if config.sequence_parallel and model_config.seq_length % \
                config.tensor_model_parallel_size:
            raise ConfigError(
                f"thought-memory under --sequence-parallel: the row length "
                f"{model_config.seq_length} must be divisible by TP "
                f"{config.tensor_model_parallel_size} (set --tm-row-length)")
        if not kwargs.get("pre_process", True) or not kwargs.get("post_process", True):
            raise ConfigError("thought-memory needs the whole model on one pipeline stage")
        if config.recompute_granularity == "full":
            raise ConfigError("thought-memory drives its layers itself: no full recompute")
        pattern, source_layer = options.resolved(config.num_layers)
        super().__init__(config, model_config, transformer_impl, attention, **kwargs)
        self.thought, self.pattern, self.source_layer = options, pattern, source_layer
        s_spec = layer_spec(transformer_impl, attention)
        c_spec = gated_cross_attention_layer_spec(options.newest_first)
        final_norm = block_spec(1, transformer_impl, attention).layer_norm
        # Replaces the homogeneous decoder PythiaModel built (same names, mixed layers).
        self.decoder = TransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(
                layer_specs=[s_spec if kind == "S" else c_spec for kind in self.pattern],
                layer_norm=final_norm),
            pre_process=True, post_process=True, pg_collection=self.pg_collection,
            vp_stage=self.vp_stage,
        )
        self.s_rep = SentenceVectorHead(config, dropout=options.s_rep_dropout,
                                        hinge_weight=options.hinge_weight)

    def _seed(self, embeds: Tensor, seed: Tensor, wrote: Tensor) -> Tensor:
        """Replace position 0 of `embeds` [L(/tp), B, h] by `seed` [B, h] where `wrote` [B].

        Under sequence parallelism position 0 lives on TP rank 0; every rank still uses the
        seed (with a zero mask elsewhere) behind a copy whose backward sums over TP, so each
        rank receives rank 0's gradient and the backward's collectives run everywhere."""
        use = wrote[:, None]
        if self.config.sequence_parallel:
            seed = copy_to_tensor_model_parallel_region(seed)
            use = use & (parallel_state.get_tensor_model_parallel_rank() == 0)
        first = torch.where(use, seed, embeds[0])
        return torch.cat([first[None], embeds[1:]])

    def run_sentence(self, embeds: Tensor, memory: Tensor,
                     counts: Tensor) -> tuple[Tensor, Tensor]:
        """One sentence row through the stack: embeds [L, B, h] ->
        (final-LN hidden [L, B, h], residual stream after the source layer [L, B, h])."""
        length = embeds.shape[0] * (self.config.tensor_model_parallel_size
                                    if self.config.sequence_parallel else 1)
        rotary = self.rotary_pos_emb(length, device=embeds.device)
        hidden, source = embeds, None
        for index, layer in enumerate(self.decoder.layers):
            hidden, _ = layer(hidden_states=hidden, attention_mask=None, context=memory,
                              context_mask=counts, rotary_pos_emb=rotary)
            if index == self.source_layer:
                source = hidden
        return self.decoder.final_layernorm(hidden), source

    def forward(self, input_ids: Tensor, targets: Tensor, weights: Tensor | None = None,
                valid: Tensor | None = None, hinge_rows: Tensor | None = None,
                return_logits: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """input_ids, targets [B, T, L] long, weights [B, T, L] or None, valid [B, T] bool
        (None: every row) -> (per-token loss [B, T, L], aux).

        With `weights`, the loss is CE × stream_token_weights (this batch's own aggregate) and
        aux["s_rep_hinge_loss"] is Σ_t hinge, as in the paper. Without (the trainer: the batch's
        loss_mask carries weights normalised over the whole global batch, and the engine divides
        by their sum, the number of sentence indices), the loss is the plain CE and the hinge is
        averaged over the T indices the same way. With `hinge_rows` [B, T] (per-row weights
        normalised over the whole global batch by the data builder) the hinge comes as
        "s_rep_hinge_loss_sum", Σ hinge·hinge_rows, which the engine normalises like the LM
        loss sum, so micro-batching and data parallelism do not change it. aux also holds
        "memory_writes" (count),
        with `weights` "per_token_ce" [B, T, L], and with `return_logits` "logits"
        [B, T, L, V/tp].
        """
        batch, sentences, length = input_ids.shape
        if valid is None:
            valid = torch.ones(batch, sentences, dtype=torch.bool, device=input_ids.device)
        valid = valid.to(torch.bool)
        memory: FifoMemory | None = None
        previous: Tensor | None = None  # S_REP of sentence t-1 [B, h]
        wrote = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        hinge = torch.zeros((), device=input_ids.device)
        writes = torch.zeros((), dtype=torch.long, device=input_ids.device)
        ce_rows, logit_rows = [], []
        for t in range(sentences):
            ids = input_ids[:, t]
            embeds = self.embed(ids)  # [L, B, h]
            if memory is None:
                memory = self.memory_class(self.thought.memory_size, batch, embeds.shape[-1],
                                           embeds.device, embeds.dtype)
                hinge = hinge.to(embeds.dtype)
            if previous is not None:  # seeding: the BOS input becomes S_REP of sentence t-1
                embeds = self._seed(embeds, previous.to(embeds.dtype), wrote)
            m, counts = memory.read()
            hidden, source = self.run_sentence(embeds, m, counts)
            is_eos = ids == self.thought.eos_id
            has_eos = is_eos.any(dim=1)
            eos_at = is_eos.to(torch.int64).argmax(dim=1)  # first EOS (0 when none)
            if self.config.sequence_parallel:  # every rank needs every row's EOS position;
                # the gradient reaching it is the same on every rank (replicated head)
                source = gather_from_sequence_parallel_region(
                    source, tensor_parallel_output_grad=False)
            at_eos = source[eos_at, torch.arange(batch, device=ids.device)]  # [B, h]
            write = valid[:, t] & has_eos
            vectors, row_hinge = self.s_rep(
                at_eos, write, None if hinge_rows is None else hinge_rows[:, t] * write)
            memory.write(vectors, write)
            previous, wrote = vectors, write
            hinge = hinge + row_hinge
            writes = writes + write.sum()
            logits = self.output_logits(hidden)  # [L, B, V/tp]
            if return_logits:  # copied first: megatron's vocab-parallel CE edits logits in place
                logit_rows.append(logits.transpose(0, 1).clone())
            ce_rows.append(self.compute_language_model_loss(targets[:, t], logits))
        ce = torch.stack(ce_rows, dim=1)  # [B, T, L]
        hinge_key = "s_rep_hinge_loss" if hinge_rows is None else "s_rep_hinge_loss_sum"
        if weights is None:
            loss = ce
            if hinge_rows is None:
                hinge = hinge / sentences
        else:
            loss = ce * stream_token_weights(weights.to(ce.dtype), valid, self.thought.loss_mode)
        aux: dict[str, Tensor] = {hinge_key: hinge, "memory_writes": writes}
        if weights is not None:  # the trainer's aux values are scalars; its loss is the CE
            aux["per_token_ce"] = ce
        if return_logits:
            aux["logits"] = torch.stack(logit_rows, dim=1)
        return loss, aux


__all__ = [
    "LOSS_MODES",
    "ThoughtMemoryModel",
    "ThoughtMemoryOptions",
    "default_layer_pattern",
    "default_source_layer",
    "stream_loss",
    "stream_token_weights",
]
