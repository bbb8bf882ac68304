#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE or unigram) from JSONL, Parquet or plain-text files."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_latent.data.tokenizer_args import RESERVED_SPECIAL_TOKENS  # noqa: E402

EPILOG = f"""\
output:
  {{output_prefix}}.model and {{output_prefix}}.vocab; use the .model with
  --tokenizer-type SentencePieceTokenizer --tokenizer-model {{output_prefix}}.model.

the model:
  Lossless by default: identity normalization, whitespace kept, byte fallback (no <unk>),
  digits split. Ids 0-3 are <unk> <s> </s> <pad>; </s> is the end-of-document token.
  --special-tokens become user-defined pieces with ids from 4 on, never split when encoding
  (default: {' '.join(RESERVED_SPECIAL_TOKENS)}; pass --special-tokens with no value for none).

input:
  .jsonl/.json/.ndjson (optionally .gz) and .parquet files read the --json-keys fields;
  .txt files are read line by line. Directories and quoted globs are expanded. Training uses
  the non-blank lines of the text (a seeded sample of --max-sentences lines if there are more).

example:
  python tools/train_tokenizer.py --input data/demo/shakespeare_train.jsonl \\
      --output-prefix data/demo/tokenizer --vocab-size 4096
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, help="Files, directories or globs.")
    parser.add_argument(
        "--output-prefix", required=True, help="Writes {prefix}.model and {prefix}.vocab."
    )
    parser.add_argument("--vocab-size", type=int, default=4096, help="Default 4096.")
    parser.add_argument(
        "--model-type", choices=["bpe", "unigram"], default="bpe", help="Default bpe."
    )
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSON keys / Parquet columns to read."
    )
    parser.add_argument(
        "--special-tokens",
        nargs="*",
        default=list(RESERVED_SPECIAL_TOKENS),
        metavar="TOKEN",
        help="User-defined special tokens (default: the project's reserved ones).",
    )
    parser.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="Map unknown characters to <unk> instead of UTF-8 byte pieces.",
    )
    parser.add_argument(
        "--normalization",
        default="identity",
        help="SentencePiece normalization rule (default identity: lossless; e.g. nmt_nfkc).",
    )
    parser.add_argument(
        "--character-coverage", type=float, default=0.9995, help="Default 0.9995."
    )
    parser.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        help="Train on at most this many lines (seeded sample). Default 2000000.",
    )
    parser.add_argument("--seed", type=int, default=1234, help="Sampling seed. Default 1234.")
    parser.add_argument(
        "--threads", type=int, default=max(1, os.cpu_count() or 1), help="Training threads."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_latent.data.tokenizer_training import (
        TokenizerTrainingConfig,
        special_token_ids,
        train_sentencepiece,
    )

    config = TokenizerTrainingConfig(
        input=args.input,
        output_prefix=args.output_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        json_keys=args.json_keys,
        special_tokens=args.special_tokens,
        byte_fallback=args.byte_fallback,
        normalization=args.normalization,
        character_coverage=args.character_coverage,
        max_sentences=args.max_sentences,
        seed=args.seed,
        threads=args.threads,
    )
    try:
        model = train_sentencepiece(config)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.special_tokens:
        ids = special_token_ids(model, args.special_tokens)
        print("Special tokens: " + ", ".join(f"{t}={i}" for t, i in ids.items()))
    print(f"Wrote {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
