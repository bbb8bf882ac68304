#!/usr/bin/env python
"""Show what a Megatron .bin/.idx indexed dataset holds: counts, lengths, one document."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns on import that the GPU kernel libraries are absent; data tools use none.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

EPILOG = """\
prints:
  token dtype, the tokenizer named by the dataset's {prefix}.tokenizer.json (with a warning
  when the tokenizer flags name another one), documents, sequences, tokens; a histogram of
  document lengths (and of sentence lengths for a sentence-level dataset, one made with
  --split-sentences);
  with --document N, document N decoded (token ids without tokenizer flags), and for a
  sentence-level dataset one numbered line per sentence, quoted so that the whitespace at
  every sentence boundary shows.

example:
  python tools/inspect_dataset.py data/demo/shakespeare_valid_text_sentence --document 0 \\
      --tokenizer-type SentencePieceTokenizer --tokenizer-model data/demo/tokenizer.model
"""


def build_parser() -> argparse.ArgumentParser:
    from megatron_latent.data.tokenizer_args import add_tokenizer_args

    parser = argparse.ArgumentParser(
        description=__doc__.strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prefix", help="Dataset prefix (path without .bin/.idx).")
    parser.add_argument("--document", type=int, help="Show this document (0-based).")
    parser.add_argument("--bins", type=int, default=10, help="Histogram bins. Default 10.")
    add_tokenizer_args(parser, required=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_latent.data.dataset_tools import (
        document_sequences,
        format_histogram,
        length_histogram,
        render_document,
        summarize,
    )
    from megatron_latent.data.indexed import sidecar_path
    from megatron_latent.data.provenance import tokenizer_fingerprint
    from megatron_latent.data.tokenizer_args import tokenizer_from_args

    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    try:
        tokenizer = tokenizer_from_args(args) if args.tokenizer_type else None
        summary = summarize(prefix)
        level = "sentence" if summary.is_sentence_level else "document"
        print(f"dataset:   {prefix}")
        print(f"level:     {level}")
        print(f"dtype:     {summary.dtype}")
        if summary.tokenizer is None:
            print(f"tokenizer: unknown (no {sidecar_path(prefix)})")
        else:
            print(f"tokenizer: {summary.tokenizer.describe()}")
            if tokenizer is not None:
                differences = summary.tokenizer.differences(tokenizer_fingerprint(tokenizer))
                if differences:
                    print("warning: the dataset was made with another tokenizer than the one "
                          f"given: {'; '.join(differences)}", file=sys.stderr)
        print(f"documents: {summary.documents}")
        print(f"sequences: {summary.sequences}")
        print(f"tokens:    {summary.tokens}")
        print("\ntokens per document:")
        print(format_histogram(length_histogram(summary.document_lengths, args.bins)))
        if summary.is_sentence_level:
            print("\ntokens per sentence:")
            print(format_histogram(length_histogram(summary.sequence_lengths, args.bins)))
        if args.document is not None:
            sequences = document_sequences(prefix, args.document)
            tokens = sum(len(s) for s in sequences)
            print(f"\ndocument {args.document}: {len(sequences)} sequences, {tokens} tokens")
            print(render_document(sequences, tokenizer))
    except (ValueError, IndexError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
