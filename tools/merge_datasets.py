#!/usr/bin/env python
"""Concatenate Megatron .bin/.idx indexed datasets into one (as Megatron-LM's merge_datasets)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns on import that the GPU kernel libraries are absent; data tools use none.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

EPILOG = """\
inputs:
  Each --input is a directory (every complete .bin/.idx pair in it, sorted by name, as
  Megatron-LM's tool reads it) or a dataset prefix; they are merged in the order given.
  All inputs must store tokens in the same dtype (same tokenizer vocabulary size), and inputs
  with a tokenizer sidecar ({prefix}.tokenizer.json) must name the same tokenizer.

output:
  {output_prefix}.bin and .idx, written as *.incomplete and renamed when complete, with the
  inputs' tokenizer sidecar when every input has one (Megatron-LM's datasets have none). An
  output that sits in an input directory is left out of the inputs.

example:
  python tools/merge_datasets.py --input data/shards --output-prefix data/all_text_document
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="Directories or dataset prefixes, in order."
    )
    parser.add_argument(
        "--output-prefix", required=True, help="Prefix of the merged .bin/.idx."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_latent.data.dataset_tools import merge_datasets, resolve_dataset_inputs

    try:
        prefixes = resolve_dataset_inputs(args.input, exclude=args.output_prefix)
        for prefix in prefixes:
            print(f"Adding {prefix}", file=sys.stderr)
        counts = merge_datasets(prefixes, args.output_prefix)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"Wrote {args.output_prefix}.bin/.idx: {counts['datasets']} datasets, "
        f"{counts['documents']} documents, {counts['sequences']} sequences; "
        f"{counts['tokenizer']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
