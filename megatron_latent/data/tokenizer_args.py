"""Megatron-LM's tokenizer command-line flags, shared by the data tools.

Kept apart from ``tokenizers.py`` so that ``--help`` does not import megatron-core.
"""

from __future__ import annotations

import argparse
from typing import Any

TOKENIZER_TYPE_NAMES: tuple[str, ...] = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
)
"""``--tokenizer-type`` values, Megatron-LM's names."""

RESERVED_SPECIAL_TOKENS: tuple[str, ...] = ("<thought>", "</thought>", "<sent>")
"""Special tokens later methods of this project use; ``tools/train_tokenizer.py`` reserves them
by default so they get ids inside the trained vocabulary."""


def add_tokenizer_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add ``--tokenizer-type``, ``--tokenizer-model``, ``--vocab-file``, ``--merge-file``,
    ``--tokenizer-special-tokens`` and ``--eod-token``."""
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument(
        "--tokenizer-type",
        required=required,
        choices=TOKENIZER_TYPE_NAMES,
        help="Which tokenizer (Megatron-LM's names).",
    )
    group.add_argument(
        "--tokenizer-model",
        help="SentencePiece .model, Hugging Face tokenizer.json (or its directory), or a "
        "directory written by Tokenizer.save.",
    )
    group.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json.")
    group.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt.")
    group.add_argument(
        "--tokenizer-special-tokens",
        nargs="+",
        default=[],
        metavar="TOKEN",
        help="Special tokens to add after loading (never split when encoding).",
    )
    group.add_argument(
        "--eod-token",
        help="HuggingFaceTokenizer: the end-of-document token, when tokenizer_config.json "
        "names no eos_token.",
    )


def tokenizer_from_args(args: Any):
    """Build the tokenizer the ``add_tokenizer_args`` flags describe."""
    from megatron_latent.data.tokenizers import build_tokenizer

    return build_tokenizer(
        args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        special_tokens=args.tokenizer_special_tokens,
        eod_token=args.eod_token,
    )
