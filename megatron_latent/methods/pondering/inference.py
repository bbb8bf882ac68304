"""Pondering's generation stepping: one static KV cache per pass."""

from __future__ import annotations

from megatron.core.inference.contexts import StaticInferenceContext


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
