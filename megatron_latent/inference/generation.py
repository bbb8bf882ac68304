"""Batched generation for every model of the project, with or without KV caches.

Prompts of different lengths share one batch without padding: all rows are prefilled up to
the shortest prompt, then the batch advances one position per step; a row whose prompt is not
used up yet is fed its next prompt token instead of the sampled one (megatron-core's static
engine does the same). Every row thus sees exactly its own tokens at positions 0..t.

The cached path keeps the model's KV caches (one per pass for pondering), so each new token
costs one single-position forward (k + 1 single-token passes for pondering). The uncached path
recomputes the whole prefix for every token; it is the reference and the baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .sampling import GenerationConfig, select_next_tokens
from .stepping import (
    broadcast_from_tensor_parallel_source,
    last_token_logits,
    make_inference_context,
    max_positions,
    sequence_parallel_disabled,
    true_vocab_size,
)

Detokenize = Callable[[list[int]], str]


@dataclass
class Generation:
    """One prompt's continuation."""

    #: Generated token ids (prompt excluded; a stop token is not included).
    tokens: list[int]
    #: "stop_token", "stop_string" or "length".
    finish_reason: str
    #: Detokenized continuation, cut before a stop string (only with `detokenize`).
    text: str | None = None


class PromptProgress:
    """Book-keeping of one prompt during decoding."""

    def __init__(self, prompt_length: int):
        self.prompt_length = prompt_length
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.text: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, config: GenerationConfig, detokenize: Detokenize | None) -> None:
        if token in config.stop_token_ids:
            self.finish_reason = "stop_token"
            return
        self.tokens.append(token)
        if config.stop_strings and detokenize is not None:
            text = detokenize(self.tokens)
            cuts = [text.find(stop) for stop in config.stop_strings if stop in text]
            if cuts:
                self.finish_reason, self.text = "stop_string", text[:min(cuts)]
                return
        if len(self.tokens) >= config.max_new_tokens:
            self.finish_reason = "length"

    def result(self, detokenize: Detokenize | None) -> Generation:
        text = self.text
        if text is None and detokenize is not None:
            text = detokenize(self.tokens)
        return Generation(list(self.tokens), self.finish_reason or "length", text)


def _check(model, prompts: Sequence[Sequence[int]], config: GenerationConfig,
           detokenize: Detokenize | None) -> int:
    config.validate()
    if not prompts:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if config.stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize callable")
    vocab = true_vocab_size(model)
    for prompt in prompts:
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {list(prompt)}")
    total = max(len(p) for p in prompts) + config.max_new_tokens
    limit = max_positions(model)
    if limit is not None and total > limit:
        raise ValueError(
            f"longest prompt + max_new_tokens = {total} positions exceeds the model's "
            f"max_position_embeddings {limit}"
        )
    return total


@torch.no_grad()
def generate_with_details(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    detokenize: Detokenize | None = None,
    use_cache: bool = True,
) -> list[Generation]:
    """Continue every prompt; returns tokens, finish reason and (with detokenize) text.

    Runs on every rank of the TP group with the same prompts; every rank returns the same
    result. Token-for-token identical with and without the cache (up to float rounding).
    """
    config = config or GenerationConfig()
    total = _check(model, prompts, config, detokenize)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    rows = [PromptProgress(n) for n in lengths]
    generator = torch.Generator(device=device).manual_seed(config.seed)
    start = min(lengths)
    context = make_inference_context(model, batch, total) if use_cache else None
    try:
        with sequence_parallel_disabled(model):
            step_input = tokens[:, :start]
            for position in range(start, total):
                if context is not None:
                    logits = last_token_logits(model, step_input, context)
                    context.increment_sequence_len_offset(step_input.shape[1])
                else:
                    logits = last_token_logits(model, tokens[:, :position])
                chosen = broadcast_from_tensor_parallel_source(
                    select_next_tokens(logits, config, generator))
                for index, state in enumerate(rows):
                    if position < state.prompt_length or state.done:
                        continue
                    tokens[index, position] = chosen[index]
                    state.add(int(chosen[index]), config, detokenize)
                if all(state.done for state in rows):
                    break
                step_input = tokens[:, position:position + 1]
    finally:
        model.train(was_training)
    return [state.result(detokenize) for state in rows]


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    detokenize: Detokenize | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Generated token ids for each prompt (prompt excluded); see `generate_with_details`."""
    return [g.tokens for g in generate_with_details(model, prompts, config, detokenize, use_cache)]
