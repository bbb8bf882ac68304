#!/usr/bin/env python
"""Add the four latent-thought tokens (<|START_OF_LATENT|> <|END_OF_LATENT|> <|PRIOR_PREFIX|>
<|POSTERIOR_PREFIX|>) to a tokenizer, and optionally grow a checkpoint's input embedding and
output head to match, so a pretrained model continues training with them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_latent.config import ConfigError  # noqa: E402

EPILOG = """\
what it does:
  The tokens get ids V..V+3 after the base vocabulary V, in the order above: added special
  tokens of a Hugging Face tokenizer.json (its tokenizer_config.json is copied along), or
  USER_DEFINED pieces appended to a SentencePiece .model. With --load/--save, the checkpoint's
  rows 0..V-1 are kept bit-identical, four rows are inserted at V..V+3 in both the input
  embedding and the output head (N(0, d^-0.5) clamped to +-3 sigma, torch generator seeded
  --seed, embedding rows drawn first), the rows after the vocabulary move up by four and the
  vocabulary is re-padded (--make-vocab-size-divisible-by x TP). The new checkpoint holds
  weights only and records vocab_size V+4 and the new tokenizer.

example:
  python tools/add_latent_tokens.py --tokenizer-type SentencePieceTokenizer \\
      --tokenizer-model data/demo/tokenizer.model --output-tokenizer data/latent/tokenizer.model \\
      --load checkpoints/base --save checkpoints/base_latent
  python pretrain.py ... --tokenizer-type SentencePieceTokenizer \\
      --tokenizer-model data/latent/tokenizer.model --load checkpoints/base_latent --finetune
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip(), epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-type", required=True,
                        choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                 "HuggingFaceTokenizer"])
    parser.add_argument("--tokenizer-model", required=True,
                        help="the input .model (SentencePiece) or tokenizer.json / its directory")
    parser.add_argument("--output-tokenizer", required=True,
                        help="the grown tokenizer to write: a .model, or a tokenizer.json (a "
                             "path not ending in .json is a directory to write it into)")
    parser.add_argument("--load", default=None, help="checkpoint directory to grow")
    parser.add_argument("--save", default=None, help="directory for the grown checkpoint (new)")
    parser.add_argument("--iteration", type=int, default=None,
                        help="iteration of --load (default: its latest)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None,
                        help="TP size to split the grown checkpoint for (default: --load's); "
                             "any TP loads it")
    parser.add_argument("--seed", type=int, default=42, help="seed of the new rows (default 42)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if (args.load is None) != (args.save is None):
        raise ConfigError("--load and --save go together (the checkpoint to grow and where "
                          "to write the grown one)")
    if args.iteration is not None and args.load is None:
        raise ConfigError("--iteration needs --load")
    if args.tensor_model_parallel_size is not None and args.load is None:
        raise ConfigError("--tensor-model-parallel-size needs --load")
    if args.tensor_model_parallel_size is not None and args.tensor_model_parallel_size < 1:
        raise ConfigError("--tensor-model-parallel-size must be >= 1, got "
                          f"{args.tensor_model_parallel_size}")
    if not os.path.exists(args.tokenizer_model):
        raise ConfigError(f"--tokenizer-model {args.tokenizer_model!r} does not exist")
    if args.save is not None and os.path.exists(args.save):
        raise ConfigError(f"--save {args.save!r} exists; choose a new directory")
    if args.load is not None and not os.path.isdir(args.load):
        raise ConfigError(f"--load {args.load!r} is not a checkpoint directory")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from megatron_latent.data.tokenizers import build_tokenizer
        from megatron_latent.latent import LATENT_TOKENS
        from megatron_latent.latent.tokens import (
            add_latent_tokens_to_tokenizer,
            check_checkpoint_vocab,
            grow_checkpoint,
            latent_token_ids,
        )

        _check_args(args)
        if args.load is not None:  # refuse a mismatched checkpoint before writing anything
            source = build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model)
            try:
                base = latent_token_ids(source).sol
            except ConfigError:
                base = source.vocab_size
            check_checkpoint_vocab(args.load, base, args.iteration)
        result = add_latent_tokens_to_tokenizer(args.tokenizer_model, args.tokenizer_type,
                                                args.output_tokenizer)
        ids = ", ".join(f"{t}={i}" for t, i in zip(LATENT_TOKENS, result.ids.as_tuple()))
        note = " (the input already had them; copied unchanged)" if result.already_present else ""
        print(f"tokenizer: vocab {result.base_vocab_size} -> {result.vocab_size}; {ids}{note}")
        print(f"wrote {result.output_path}")
        if args.load is not None:
            grown = grow_checkpoint(args.load, args.save, result.vocab_size,
                                    tokenizer_type=args.tokenizer_type,
                                    tokenizer_model=result.output_path, seed=args.seed,
                                    iteration=args.iteration,
                                    tensor_parallel_size=args.tensor_model_parallel_size)
            print(f"checkpoint: {args.load} (iteration {grown.iteration}) vocab "
                  f"{grown.old_vocab_size} -> {grown.new_vocab_size}; padded rows "
                  f"{grown.old_rows} -> {grown.new_rows} (TP={grown.tensor_parallel_size}); "
                  f"new rows {grown.ids.sol}..{grown.ids.pos} drawn with seed {args.seed}")
            print(f"wrote {grown.output_dir} (weights only: train with --load "
                  f"{grown.output_dir} --finetune)")
    except ConfigError as error:  # TokenizerError is a ConfigError
        print(f"add_latent_tokens.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
