"""FLOPs per token of everything pondering executes: k + 1 passes and k mixing matmuls."""

from __future__ import annotations

from ...config import ModelConfig
from ...flops import FlopsBreakdown, forward_flops_per_token
from .options import PonderingOptions


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
