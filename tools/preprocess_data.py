#!/usr/bin/env python
"""Tokenize JSONL / Parquet documents into Megatron .bin/.idx indexed datasets.

Same flags and output as Megatron-LM's tools/preprocess_data.py: one dataset per JSON key,
named {output_prefix}_{key}_document (or _sentence with --split-sentences), written with
megatron-core's IndexedDatasetBuilder and the token dtype Megatron picks for the vocabulary.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns on import that the GPU kernel libraries are absent; data tools use none.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

EPILOG = """\
input:
  --input takes one or more JSONL files (.jsonl/.json/.ndjson, optionally .gz), Parquet files,
  directories (their supported files, sorted by name) or quoted globs ('data/*.jsonl.gz').
  Every record must hold a non-empty string under each --json-keys key.

output:
  {output_prefix}_{key}_document.bin/.idx, or {output_prefix}_{key}_sentence.bin/.idx with
  --split-sentences (Megatron-LM's names). Files are written as *.incomplete and renamed when
  done, so an interrupted run never leaves a pair that looks finished. Documents keep their
  input order: the bytes are the same for any --workers / --partitions.
  Next to each dataset, {prefix}.tokenizer.json names the tokenizer (type, files, vocabulary
  size, end-of-document id, SHA-256 of the vocabulary); training refuses a dataset whose
  tokenizer is not the run's.

sentences (--split-sentences):
  Each document becomes one sequence per sentence (pysbd, no download). Unlike Megatron-LM,
  the document is tokenized once and its tokens are cut at sentence starts, so a document's
  sentences concatenate to exactly its document-level tokens (whitespace and newlines kept).
  A single newline does not end a sentence unless --split-on-newlines; a blank line does.
  Note: GPTDataset treats every sequence as a document, so train GPT models on _document
  datasets; _sentence datasets carry sentence boundaries for sentence-level methods.

example:
  python tools/preprocess_data.py --input data/demo/shakespeare_train.jsonl \\
      --output-prefix data/demo/shakespeare_train --tokenizer-type SentencePieceTokenizer \\
      --tokenizer-model data/demo/tokenizer.model --append-eod --workers 2
"""


def build_parser() -> argparse.ArgumentParser:
    from megatron_latent.data.tokenizer_args import add_tokenizer_args

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_tokenizer_args(parser)
    group = parser.add_argument_group(title="input data")
    group.add_argument(
        "--input", nargs="+", required=True, help="Input files, directories or globs."
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="Keys (Parquet: columns) to extract; one output dataset per key. Default: text.",
    )
    group.add_argument(
        "--split-sentences",
        action="store_true",
        help="One sequence per sentence inside each document; output named _sentence.",
    )
    group.add_argument(
        "--keep-newlines",
        action="store_true",
        help="Accepted for Megatron-LM compatibility. Newlines are always kept here, since "
        "sentences are cut from the document's own tokens.",
    )
    group.add_argument(
        "--split-on-newlines",
        action="store_true",
        help="With --split-sentences: every line break also ends a sentence.",
    )
    group.add_argument(
        "--lang", default="en", help="Language code for sentence splitting (pysbd). Default: en."
    )
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument(
        "--append-eod",
        action="store_true",
        help="Append the end-of-document token to every document.",
    )
    group.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="Skip records that are malformed JSON, lack a key, are empty or are not UTF-8, "
        "and report how many at the end (default: stop at the first, naming file and line).",
    )
    group = parser.add_argument_group(title="output data")
    group.add_argument(
        "--output-prefix", required=True, help="Path prefix of the output files."
    )
    group = parser.add_argument_group(title="runtime")
    group.add_argument(
        "--workers", type=int, default=1, help="Tokenizing worker processes (default 1)."
    )
    group.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="Split the input into this many contiguous parts processed in parallel (each with "
        "workers/partitions workers) and merged in order. Default 1.",
    )
    group.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="Report progress every this many documents (default 1000; 0: never).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_latent.data.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        input=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_special_tokens=args.tokenizer_special_tokens,
        eod_token=args.eod_token,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        split_sentences=args.split_sentences,
        split_on_newlines=args.split_on_newlines,
        lang=args.lang,
        workers=args.workers,
        partitions=args.partitions,
        log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines,
    )
    try:
        stats = preprocess(config)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    print(f"Done: {stats.summary()}", file=sys.stderr)
    from megatron_latent.data.indexed import sidecar_path

    for prefix in stats.outputs:
        print(f"Wrote {prefix}.bin, {prefix}.idx and {sidecar_path(prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
