"""Pondering's options and flags, its pipeline refusal, and the architecture change it needs
(the output-projection init of a model whose stack runs k + 1 times)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ...config import ConfigError, ModelConfig

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
