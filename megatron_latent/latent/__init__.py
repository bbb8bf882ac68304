"""Latent thoughts (BoLT; docs/latent_thoughts.md, ../shared/methods/latent_thoughts.md):
text augmented with inferred thoughts z behind each chunk x, from a teacher or from the model
itself by EM. This package holds the pieces: the four special tokens, chunking, the prior and
posterior training formats, synthesis and the E-step.

The four tokens are appended after a tokenizer's base vocabulary in this order; from then on
everything is token ids (text is never tokenised into them).
"""

from __future__ import annotations

from dataclasses import dataclass

#: <|START_OF_LATENT|> (SoL), <|END_OF_LATENT|> (EoL), <|PRIOR_PREFIX|> (PRI),
#: <|POSTERIOR_PREFIX|> (POS), in the order they are appended.
LATENT_TOKENS = ("<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>",
                 "<|POSTERIOR_PREFIX|>")


@dataclass(frozen=True)
class LatentTokenIds:
    """The ids of the four latent-thought tokens in one tokenizer."""

    sol: int
    eol: int
    pri: int
    pos: int

    @classmethod
    def after(cls, base_vocab_size: int) -> LatentTokenIds:
        """The ids when the four tokens follow a base vocabulary of `base_vocab_size` ids."""
        return cls(*range(base_vocab_size, base_vocab_size + 4))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.sol, self.eol, self.pri, self.pos)


__all__ = ["LATENT_TOKENS", "LatentTokenIds"]
