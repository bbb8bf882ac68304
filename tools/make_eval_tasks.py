#!/usr/bin/env python
"""Write offline lm-eval tasks (JSONL + task YAMLs) from the demo corpus's held-out plays."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPILOG = """\
tasks (all tagged demo_offline):
  demo_next_line       multiple choice: a few lines of a scene, the true next line among
                       3 distractor lines from elsewhere in the held-out plays
  demo_cloze           loglikelihood, like lambada_openai: a passage less its last word,
                       target " " + word; metrics acc and perplexity
  demo_wikitext_style  loglikelihood_rolling, like wikitext: whole scenes; metrics
                       word_perplexity, byte_perplexity, bits_per_byte

source:
  By default the validation plays of tools/prepare_demo_corpus.py with its default split
  (the held-out plays of `make demo`); --input takes a JSONL of documents with a "text" field
  instead (e.g. demo_output/data/shakespeare_valid.jsonl gives the same tasks). The same
  arguments always give the same files.

output:
  {output_dir}/{task}.jsonl, {output_dir}/{task}.yaml and README.md. The YAMLs read the JSONL
  by absolute path, so pass the directory to lm-eval as it is:
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=MODEL_DIR --include_path OUTPUT_DIR --tasks demo_offline

standard tasks from local files:
  --standard-task hellaswag=/data/hellaswag_validation.jsonl writes hellaswag_local.yaml,
  which includes lm-eval's own hellaswag YAML (prompt, choices, metrics, process_docs) and
  reads the documents from the file; the file keeps the Hub dataset's fields.

example:
  python tools/make_eval_tasks.py --output-dir demo_output/eval_tasks --num-docs 100
"""


def build_parser() -> argparse.ArgumentParser:
    from megatron_latent.evaluation.offline_tasks import (
        DEFAULT_SPLIT_SEED,
        DEFAULT_VALID_PLAYS,
        TaskOptions,
    )

    d = TaskOptions()
    parser = argparse.ArgumentParser(description=__doc__.strip(), epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output/eval_tasks",
                        help="Default demo_output/eval_tasks.")
    parser.add_argument("--num-docs", type=int, default=d.num_docs,
                        help=f"Examples of demo_next_line and of demo_cloze. Default {d.num_docs}.")
    parser.add_argument("--num-rolling-docs", type=int, default=d.num_rolling_docs,
                        help=f"Scenes of demo_wikitext_style. Default {d.num_rolling_docs}.")
    parser.add_argument("--rolling-max-chars", type=int, default=d.rolling_max_chars,
                        help="Cut each scene at a line boundary to at most this many "
                        f"characters (0: whole scenes). Default {d.rolling_max_chars}.")
    parser.add_argument("--context-lines", type=int, default=d.context_lines,
                        help=f"Non-blank lines of context of demo_next_line. Default "
                        f"{d.context_lines}.")
    parser.add_argument("--cloze-context-lines", type=int, default=d.cloze_context_lines,
                        help="Lines before the cut line in demo_cloze. Default "
                        f"{d.cloze_context_lines}.")
    parser.add_argument("--num-distractors", type=int, default=d.num_distractors,
                        help=f"Wrong choices of demo_next_line. Default {d.num_distractors}.")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"Default {d.seed}.")
    parser.add_argument("--input", help="JSONL of held-out documents instead of the demo split.")
    parser.add_argument("--valid-plays", type=int, default=DEFAULT_VALID_PLAYS,
                        help=f"The demo split's held-out plays. Default {DEFAULT_VALID_PLAYS}, "
                        "as prepare_demo_corpus.py.")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED,
                        help=f"The demo split's seed. Default {DEFAULT_SPLIT_SEED}, as "
                        "prepare_demo_corpus.py.")
    parser.add_argument("--standard-task", action="append", default=[], metavar="NAME=JSONL",
                        help="Also write NAME_local.yaml reading lm-eval's task NAME from a "
                        "local JSONL (repeatable).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_latent.evaluation.offline_tasks import (
        TaskOptions,
        read_documents,
        validation_documents,
        write_standard_tasks,
        write_tasks,
    )

    options = TaskOptions(num_docs=args.num_docs, seed=args.seed,
                          context_lines=args.context_lines,
                          num_distractors=args.num_distractors,
                          cloze_context_lines=args.cloze_context_lines,
                          num_rolling_docs=args.num_rolling_docs,
                          rolling_max_chars=args.rolling_max_chars)
    try:
        standard = dict(spec.split("=", 1) for spec in args.standard_task)
    except ValueError:
        print("error: --standard-task takes NAME=JSONL", file=sys.stderr)
        return 1
    try:
        if args.input:
            docs, source = read_documents(args.input), f"`{args.input}`"
        else:
            docs = validation_documents(args.valid_plays, args.split_seed)
            source = (f"the demo corpus's validation plays (--valid-plays {args.valid_plays}, "
                      f"--split-seed {args.split_seed}; the defaults are `make demo`'s split)")
        standard_written = write_standard_tasks(args.output_dir, standard)
        written = write_tasks(args.output_dir, options, docs, source)
        written.update(standard_written)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"Wrote {name}: {path}")
    print(f"Use: --include_path {os.path.abspath(args.output_dir)} --tasks demo_offline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
