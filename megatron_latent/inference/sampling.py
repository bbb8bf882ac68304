"""Next-token selection from full-vocabulary logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class GenerationConfig:
    """How many tokens to generate, how to pick them, and when to stop."""

    max_new_tokens: int = 32
    #: Argmax decoding; the sampling fields below are then ignored.
    greedy: bool = False
    temperature: float = 1.0
    #: Keep the k most probable tokens (0 = all).
    top_k: int = 0
    #: Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    top_p: float = 1.0
    #: Seed of the sampling generator: the same seed gives the same tokens, at any TP size.
    seed: int = 0
    #: A prompt's generation ends when it produces one of these (e.g. the eod id); the stop
    #: token is not part of the returned tokens.
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    #: A prompt's generation ends once its generated text contains one of these (needs a
    #: `detokenize` callable); the tokens that completed it are kept, the text is cut before it.
    stop_strings: tuple[str, ...] = field(default_factory=tuple)
    #: Ids that are never selected: their logits are set to -inf before greedy or sampled
    #: selection (e.g. the four latent-thought tokens when a latent model is evaluated as a
    #: baseline). Ids outside the vocabulary are ignored.
    banned_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or use greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        if any(int(i) < 0 for i in self.banned_token_ids):
            raise ValueError(f"banned token ids must be >= 0, got {self.banned_token_ids}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set the logits outside the top-k / nucleus (top-p) set to -inf; [batch, vocab]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def select_next_tokens(logits: Tensor, config: GenerationConfig,
                       generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of full-vocabulary logits [batch, vocab] -> [batch]."""
    logits = logits.float()
    banned = [int(i) for i in config.banned_token_ids if int(i) < logits.shape[-1]]
    if banned:
        logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device),
                                   float("-inf"))
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
