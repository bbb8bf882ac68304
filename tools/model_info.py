#!/usr/bin/env python
"""Print a model preset's resolved configuration, parameter counts and FLOPs per token."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_latent.config import PRESETS, ConfigError, count_parameters, get_preset  # noqa: E402
from megatron_latent.flops import forward_flops_per_token, training_flops_per_token  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True,
                        help=f"preset name, one of: {', '.join(PRESETS)} (or '1b', '70m', ...)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None,
                        help="TP size for vocab padding (default: the preset's)")
    parser.add_argument("--seq-length", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        preset = get_preset(args.model)
        config = preset.model_config(seq_length=args.seq_length,
                                     max_position_embeddings=args.seq_length)
        tp = args.tensor_model_parallel_size or preset.recipe.tensor_model_parallel_size
        config.validate(tp)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"# {preset.name}")
    print("## model")
    for field in dataclasses.fields(config):
        print(f"{field.name}: {getattr(config, field.name)}")
    print("## training recipe")
    for field in dataclasses.fields(preset.recipe):
        print(f"{field.name}: {getattr(preset.recipe, field.name)}")
    print("## parameters")
    for size in sorted({1, tp}):
        counts = count_parameters(config, size)
        print(f"total at TP={size} (vocab padded to {counts['padded_vocab_size']}): "
              f"{counts['total']:,}")
    print(f"non-embedding: {count_parameters(config)['non_embedding']:,}")
    if preset.published_params:
        print(f"published: {preset.published_params:,}")
    fwd = forward_flops_per_token(config, tensor_parallel_size=tp)
    print("## FLOPs per token")
    print(f"forward: {fwd.forward:.4g}")
    print(f"training (3x forward): {training_flops_per_token(config, tensor_parallel_size=tp):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
