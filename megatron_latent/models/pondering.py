"""Pondering: k extra passes per step, each feeding a probability-weighted embedding back in.

E_0 is the input embedding of the tokens. For s = 1..k the whole model runs on E_{s-1},
its output distribution P_s = softmax(logits_s) mixes the rows of the input embedding table,
T_s = P_s · W_in, and E_s = E_{s-1} + T_s. The final pass on E_k gives the logits the
next-token loss is taken on. Gradients flow through every pass and every softmax.

Under tensor parallelism the logits and W_in are sharded over the same vocabulary ranges, so
each rank mixes its own shard and only [tokens, h + 1] partial sums cross the TP group: no rank
ever holds a full-vocabulary tensor. See docs/pondering.md.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from torch import Tensor

from ..config import ConfigError, ModelConfig
from ..flops import FlopsBreakdown, forward_flops_per_token
from .language_model import PythiaModel, RuntimeOptions, build_pythia_model
from .registry import MethodSpec, register_method

PIPELINE_REFUSAL = (
    "--method pondering does not support pipeline parallelism "
    "(--pipeline-model-parallel-size must be 1): every pondering pass runs the whole layer "
    "stack and feeds the last stage's output distribution back into the first stage's input. "
    "Use tensor (and sequence) parallelism to split the model; see docs/pondering.md for the "
    "pipeline design."
)


# -- options and flags -------------------------------------------------------------------
@dataclass(frozen=True)
class PonderingOptions:
    """What pondering does on top of the Pythia model."""

    #: Pondering steps k: the model runs k + 1 full passes per forward.
    steps: int = 3
    #: 0 mixes over the full vocabulary (the official Pythia setting); N > 0 keeps the N most
    #: probable tokens and renormalises over them.
    top_k: int = 0
    #: Multiply E_0 and the mixing table by sqrt(hidden).
    scale_embeds: bool = False
    #: Multiply E_0 by k before the first pass.
    multiply_steps: bool = False

    @property
    def passes(self) -> int:
        return self.steps + 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ConfigError for values that cannot run (vocab_size: the real vocabulary)."""
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"--ponder-steps must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(
                f"--ponder-top-k must be an integer >= 0 (0 = full vocabulary), got {self.top_k!r}"
            )
        if vocab_size is not None and self.top_k > vocab_size:
            raise ConfigError(
                f"--ponder-top-k {self.top_k} exceeds the vocabulary size {vocab_size}"
            )
        if self.multiply_steps and self.steps == 0:
            raise ConfigError(
                "--ponder-multiply-steps with --ponder-steps 0 would multiply the input "
                "embeddings by zero"
            )


def add_pondering_arguments(group: argparse._ArgumentGroup) -> None:
    """The pondering flags (only read when --method pondering)."""
    defaults = PonderingOptions()
    group.add_argument("--ponder-steps", type=int, default=defaults.steps,
                       help="pondering steps k: k + 1 full passes per forward (default 3)")
    group.add_argument("--ponder-top-k", type=int, default=defaults.top_k,
                       help="mix over the N most probable tokens, renormalised; 0 = the full "
                            "vocabulary (default, the official Pythia setting)")
    group.add_argument("--ponder-scale-embeds", action="store_true",
                       help="multiply input embeddings and the mixing table by sqrt(hidden)")
    group.add_argument("--ponder-multiply-steps", action="store_true",
                       help="multiply the input embeddings by k before the first pass")


def pondering_options_from_args(args: argparse.Namespace) -> PonderingOptions:
    """PonderingOptions from parsed flags; refuses impossible values."""
    defaults = PonderingOptions()
    options = PonderingOptions(
        steps=getattr(args, "ponder_steps", defaults.steps),
        top_k=getattr(args, "ponder_top_k", defaults.top_k),
        scale_embeds=bool(getattr(args, "ponder_scale_embeds", False)),
        multiply_steps=bool(getattr(args, "ponder_multiply_steps", False)),
    )
    options.validate()
    return options


def pondering_output_init_std(config: ModelConfig, options: PonderingOptions) -> float:
    """Std of the attention-dense and MLP-fc2 weights: sqrt(2 / 5h) / sqrt(2 L (k + 1)),
    the depth counting every unrolled pass."""
    return config.small_init_std / math.sqrt(2.0 * config.num_layers * options.passes)


def prepare_pondering_config(config: ModelConfig, options: PonderingOptions | None) -> ModelConfig:
    """Validate the options against the shape and set the output-projection init (an explicit
    `output_init_std` is kept). Idempotent."""
    options = options or PonderingOptions()
    options.validate(config.vocab_size)
    if config.output_init_std is not None:
        return config
    return config.replace(output_init_std=pondering_output_init_std(config, options))


# -- vocab-parallel mixing -----------------------------------------------------------------
def _all_gather_last_dim(tensor: Tensor, group) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _global_top_k(values: Tensor, top_k: int, group) -> tuple[Tensor, Tensor]:
    """Of each rank's local candidates [.., n] (sorted, no grad), which are in the global top-k.

    Returns (mask of this rank's candidates [.., n], global max [..]); every rank selects from
    the same gathered candidates, so all agree on the chosen set.
    """
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return values.new_ones(values.shape, dtype=torch.bool), values[..., 0]
    gathered = _all_gather_last_dim(values, group)
    chosen = gathered.topk(top_k, dim=-1).indices
    mask = torch.zeros_like(gathered, dtype=torch.bool).scatter_(-1, chosen, True)
    n, rank = values.shape[-1], dist.get_rank(group)
    return mask[..., rank * n:(rank + 1) * n], gathered.amax(dim=-1)


def _matmul_fp32(left: Tensor, right: Tensor) -> Tensor:
    """left @ right accumulated and returned in fp32, also for bf16/fp16 inputs: on CUDA the
    matmul writes fp32 directly (no copy of the inputs); elsewhere the inputs are upcast."""
    if left.dtype == torch.float32 and right.dtype == torch.float32:
        return torch.mm(left, right)
    if left.is_cuda:
        try:
            return torch.mm(left, right, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass  # a torch without fp32-output matmuls for this dtype
    return torch.mm(left.float(), right.float())


class _ExpWeightedRows(torch.autograd.Function):
    """[e · W, Σ e] with e = exp(logits - shift), packed as [.., h + 1] in fp32.

    The same as autograd through exp, matmul and sum, with two fewer full-vocabulary
    temporaries: e is exponentiated in place and saved alone, and the backward
    d logits = e ⊙ (dU · Wᵀ + dz) is one addmm and an in-place multiply.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, shift: Tensor, table: Tensor) -> Tensor:
        weights = (logits - shift.unsqueeze(-1)).exp_()
        flat = weights.view(-1, weights.shape[-1])
        packed = torch.cat([_matmul_fp32(flat, table),
                            flat.sum(-1, keepdim=True, dtype=torch.float32)], dim=-1)
        ctx.save_for_backward(weights, table)
        return packed.view(*weights.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, table = ctx.saved_tensors
        flat = weights.view(-1, weights.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1]).to(weights.dtype)
        grad_mixed, grad_total = grad[:, :-1], grad[:, -1:]
        grad_logits = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.addmm(grad_total, grad_mixed, table.t()).mul_(flat)
            grad_logits = grad_logits.view_as(weights)
        if ctx.needs_input_grad[2]:
            grad_table = torch.mm(flat.t(), grad_mixed)
        return grad_logits, None, grad_table


#: Rows x chosen tokens x hidden elements gathered at once by _WeightedRowSum (~256 MiB fp32).
ROW_SUM_CHUNK_ELEMENTS = 2**26


class _WeightedRowSum(torch.autograd.Function):
    """Σ_j w[i, j] · table[index[i, j]] for [N, n] weights and indices, in fp32: the top-k
    mixture. Gathers the chosen rows in bounded chunks (no [N, n, h] tensor is kept for the
    backward), and works for bf16 tables on CUDA, where embedding_bag's backward for
    per-sample weights does not exist. d w = rows · d out; d table = Σ w · d out, scattered
    back onto the chosen rows (accumulated in fp32)."""

    @staticmethod
    def _chunks(count: int, per_row: int) -> list[slice]:
        step = max(1, ROW_SUM_CHUNK_ELEMENTS // max(per_row, 1))
        return [slice(start, min(start + step, count)) for start in range(0, count, step)]

    @staticmethod
    def forward(ctx, weights: Tensor, index: Tensor, table: Tensor) -> Tensor:
        count, chosen = index.shape
        out = torch.empty(count, table.shape[1], dtype=torch.float32, device=table.device)
        for part in _WeightedRowSum._chunks(count, chosen * table.shape[1]):
            rows = table.index_select(0, index[part].reshape(-1)).view(-1, chosen, table.shape[1])
            out[part] = torch.bmm(weights[part].float().unsqueeze(1), rows.float()).squeeze(1)
        ctx.save_for_backward(weights, index, table)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, index, table = ctx.saved_tensors
        count, chosen = index.shape
        hidden = table.shape[1]
        grad = grad.float()
        grad_weights = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_weights = torch.empty(count, chosen, dtype=weights.dtype, device=weights.device)
        if ctx.needs_input_grad[2]:
            grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
        for part in _WeightedRowSum._chunks(count, chosen * hidden):
            flat_index = index[part].reshape(-1)
            if grad_weights is not None:
                rows = table.index_select(0, flat_index).view(-1, chosen, hidden).float()
                grad_weights[part] = torch.bmm(rows, grad[part].unsqueeze(-1)).squeeze(-1).to(
                    weights.dtype)
            if grad_table is not None:
                spread = weights[part].float().unsqueeze(-1) * grad[part].unsqueeze(1)
                grad_table.index_add_(0, flat_index, spread.view(-1, hidden))
        if grad_table is not None:
            grad_table = grad_table.to(table.dtype)
        return grad_weights, None, grad_table


def mix_input_embeddings(
    logits: Tensor,
    table: Tensor,
    top_k: int = 0,
    sequence_parallel: bool = False,
    group=None,
) -> Tensor:
    """T = softmax(logits) · W_in with both sharded over the vocabulary across TP ranks.

    logits: this rank's shard [s, b, V/tp] for the full sequence; table: this rank's rows of
    W_in [V/tp, h]. Returns [s, b, h], or this rank's sequence shard [s/tp, b, h] under
    sequence parallelism. With top_k > 0 only the top_k most probable tokens take part,
    renormalised. Each rank forms unnormalised partial sums (Σ e·W_in, Σ e) with e =
    exp(logits - global max); one all-reduce (reduce-scatter under SP) adds them; the division
    happens after. The max is detached: softmax does not depend on it.
    """
    if group is None and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group) if group is not None else 1
    s, b, local_vocab = logits.shape
    if top_k == 0:
        shift = logits.detach().amax(dim=-1)
        if world > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
        packed = _ExpWeightedRows.apply(logits, shift, table)
    else:
        values, index = torch.topk(logits, min(top_k, local_vocab), dim=-1)
        chosen, shift = _global_top_k(values.detach(), top_k, group if world > 1 else None)
        weights = torch.exp(values - shift.unsqueeze(-1)) * chosen.to(values.dtype)
        n = values.shape[-1]
        partial = _WeightedRowSum.apply(weights.reshape(-1, n), index.reshape(-1, n), table)
        partial = partial.view(s, b, -1)
        # Normaliser and partial mixture travel together, reduced in fp32.
        packed = torch.cat([partial.float(),
                            weights.sum(dim=-1, keepdim=True, dtype=torch.float32)], dim=-1)
    if sequence_parallel and world > 1:
        packed = reduce_scatter_to_sequence_parallel_region(packed, group=group)
    elif world > 1:
        packed = reduce_from_tensor_model_parallel_region(packed, group=group)
    return (packed[..., :-1] / packed[..., -1:]).to(table.dtype)


# -- KV caches for generation ------------------------------------------------------------
class PonderingInferenceContext:
    """One static KV cache per pondering pass.

    Pass s at position t attends only to pass s's keys/values at positions <= t, so each pass
    keeps its own cache and cached decoding costs k + 1 single-token passes per token.
    """

    def __init__(self, passes: int, max_batch_size: int, max_sequence_length: int):
        self.passes = [StaticInferenceContext(max_batch_size, max_sequence_length)
                       for _ in range(passes)]
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length

    @property
    def sequence_len_offset(self) -> int:
        return self.passes[0].sequence_len_offset

    def increment_sequence_len_offset(self, increment: int) -> None:
        for context in self.passes:
            context.increment_sequence_len_offset(increment)

    def reset(self) -> None:
        for context in self.passes:
            context.reset()


# -- the model -----------------------------------------------------------------------------
class PonderingPythiaModel(PythiaModel):
    """The Pythia model run k + 1 times per forward with pondering embeddings fed back.

    Same parameters (and checkpoint names) as PythiaModel; only the forward differs.
    """

    def __init__(self, config, model_config: ModelConfig, options: PonderingOptions,
                 transformer_impl: str = "local", attention: str = "sdpa", **kwargs):
        if not kwargs.get("pre_process", True) or not kwargs.get("post_process", True):
            raise ConfigError(PIPELINE_REFUSAL)
        if config.pipeline_model_parallel_size != 1:
            raise ConfigError(PIPELINE_REFUSAL)
        options.validate(model_config.vocab_size)
        super().__init__(config, model_config, transformer_impl, attention, **kwargs)
        self.pondering = options

    @property
    def num_passes(self) -> int:
        return self.pondering.passes

    def make_inference_context(self, max_batch_size: int,
                               max_sequence_length: int) -> PonderingInferenceContext:
        """KV caches for generation: one per pass."""
        return PonderingInferenceContext(self.num_passes, max_batch_size, max_sequence_length)

    def _pass_contexts(self, inference_context) -> list:
        if inference_context is None:
            return [None] * self.num_passes
        if not isinstance(inference_context, PonderingInferenceContext) or len(
                inference_context.passes) != self.num_passes:
            raise ValueError(
                "a pondering model needs one KV cache per pass: build the context with "
                "model.make_inference_context(max_batch_size, max_sequence_length)"
            )
        return inference_context.passes

    def ponder_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      inference_context: PonderingInferenceContext | None = None,
                      position_ids: Tensor | None = None) -> Tensor:
        """Run all k + 1 passes; the final pass's logits [s, b, V/tp]."""
        options = self.pondering
        contexts = self._pass_contexts(inference_context)
        seq_length = input_ids.shape[1]
        embeds = self.embed(input_ids)
        scale = math.sqrt(self.config.hidden_size) if options.scale_embeds else 1.0
        if options.scale_embeds:
            embeds = embeds * scale
        if options.multiply_steps:
            embeds = embeds * options.steps
        table = self.input_embedding_weight()
        for step in range(options.steps):
            hidden = self.run_decoder(embeds, seq_length, attention_mask, contexts[step],
                                      position_ids)
            logits = self.output_logits(hidden)
            mixed = mix_input_embeddings(
                logits, table, options.top_k, self.config.sequence_parallel, self.tp_group
            )
            # P · (sqrt(h) W_in) computed as sqrt(h) (P · W_in): a [s, b, h] scale, not [V, h].
            embeds = embeds + (mixed * scale if options.scale_embeds else mixed)
        hidden = self.run_decoder(embeds, seq_length, attention_mask, contexts[-1], position_ids)
        return self.output_logits(hidden)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input: Tensor | None = None,
        inference_context: PonderingInferenceContext | None = None,
    ) -> Tensor:
        """Final-pass logits [b, s, V/tp] without labels; per-token loss [b, s] with labels
        (cross-entropy on the final pass only)."""
        if decoder_input is not None:
            raise ValueError("the pondering model embeds its own tokens; decoder_input is not used")
        logits = self.ponder_logits(input_ids, attention_mask, inference_context, position_ids)
        return self.logits_or_loss(logits, labels)


def build_pondering_model(
    model_config: ModelConfig,
    runtime: RuntimeOptions | None = None,
    device: torch.device | str = "cpu",
    options: PonderingOptions | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> PonderingPythiaModel:
    """Build a PonderingPythiaModel (megatron-core parallel state must be initialised)."""
    options = options or PonderingOptions()
    runtime = runtime or RuntimeOptions(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size()
    )
    if runtime.pipeline_model_parallel_size != 1 or not (pre_process and post_process):
        raise ConfigError(PIPELINE_REFUSAL)
    model_config = prepare_pondering_config(model_config, options)
    return build_pythia_model(model_config, runtime, device,
                              model_class=PonderingPythiaModel, options=options)


# -- FLOPs ---------------------------------------------------------------------------------
def pondering_flops_breakdown(config: ModelConfig, options: PonderingOptions | None = None,
                              seq_length: int | None = None,
                              tensor_parallel_size: int = 1) -> FlopsBreakdown:
    """Forward FLOPs per token: k + 1 full passes plus k mixing steps, each 2·V·h over the
    (padded) vocabulary, or 2·N·h for the top-N weighted gather (selection not counted)."""
    options = options or PonderingOptions()
    one = forward_flops_per_token(config, seq_length, tensor_parallel_size)
    mixed_rows = options.top_k or config.padded_vocab_size(tensor_parallel_size)
    return FlopsBreakdown(
        layers=options.passes * one.layers,
        attention_scores=options.passes * one.attention_scores,
        head=options.passes * one.head,
        extra=options.steps * 2.0 * mixed_rows * config.hidden_size,
    )


def pondering_forward_flops_per_token(config: ModelConfig, options: PonderingOptions | None,
                                      seq_length: int | None, tensor_parallel_size: int) -> float:
    return pondering_flops_breakdown(config, options, seq_length, tensor_parallel_size).forward


PONDERING = register_method(
    MethodSpec(
        name="pondering",
        description="k extra passes per step feeding softmax(logits)·W_in back into the input "
                    "(PonderLM)",
        build_model=build_pondering_model,
        add_arguments=add_pondering_arguments,
        options_from_args=pondering_options_from_args,
        forward_flops_per_token=pondering_forward_flops_per_token,
        prepare_model_config=prepare_pondering_config,
        supports_pipeline_parallel=False,
        pipeline_refusal=PIPELINE_REFUSAL,
    )
)

__all__ = [
    "PIPELINE_REFUSAL",
    "PONDERING",
    "PonderingInferenceContext",
    "PonderingOptions",
    "PonderingPythiaModel",
    "add_pondering_arguments",
    "build_pondering_model",
    "mix_input_embeddings",
    "pondering_flops_breakdown",
    "pondering_forward_flops_per_token",
    "pondering_options_from_args",
    "pondering_output_init_std",
    "prepare_pondering_config",
]
