"""FLOPs accounting for training throughput and MFU (no framework imports: usable anywhere).

Counts matrix multiplications only, at 2 FLOPs per multiply-add, as Megatron-LM and the
PaLM paper do: per token and per layer, QKV + dense + MLP weights (2 x params), attention
scores and weighted values (2 x 2 x s x h, causal masking not subtracted), and the output head
(2 x h x V). Training costs 3x the forward pass (backward = 2x forward); full activation
recompute adds one more forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs per token of one pass through the model, by part."""

    layers: float
    attention_scores: float
    head: float
    extra: float = 0.0

    @property
    def forward(self) -> float:
        return self.layers + self.attention_scores + self.head + self.extra


def forward_flops_per_token(config: ModelConfig, seq_length: int | None = None,
                            tensor_parallel_size: int = 1) -> FlopsBreakdown:
    """Forward FLOPs per token of one full pass (embedding lookup is free)."""
    s = seq_length or config.seq_length
    h, f, layers = config.hidden_size, config.ffn_hidden_size, config.num_layers
    vocab = config.padded_vocab_size(tensor_parallel_size)
    return FlopsBreakdown(
        layers=2.0 * layers * (4 * h * h + 2 * h * f),
        attention_scores=2.0 * 2.0 * layers * s * h,
        head=2.0 * h * vocab,
    )


def training_flops_per_token(config: ModelConfig, seq_length: int | None = None,
                             tensor_parallel_size: int = 1, passes: int = 1,
                             extra_forward_per_pass: float = 0.0,
                             recompute: bool = False) -> float:
    """Training FLOPs per token: (forward of `passes` passes + extras) x (3, or 4 with
    full activation recompute)."""
    one = forward_flops_per_token(config, seq_length, tensor_parallel_size).forward
    multiplier = 4.0 if recompute else 3.0
    return multiplier * passes * (one + extra_forward_per_pass)
