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

GSM8K / MATH chain of thought, baseline and latent-thought variants (from local files):
  --math-data gsm8k=/data/gsm8k/test.jsonl  ({"question", "answer" ending "#### N"})
  --math-data math=/data/MATH/test.jsonl    ({"problem", "solution" with \\boxed{}})
  writes gsm8k_cot_local / gsm8k_cot_latent (8-shot) and hendrycks_math_cot_local /
  hendrycks_math_cot_latent (4-shot), tags math_cot_local and latent_math, scored by exact
  match (math_answers.py, copied alongside). STYLE=sample uses a tiny built-in sample.
  The *_latent tasks need the megatron_latent backend and a tokenizer with the four latent
  tokens (docs/evaluation.md, "Latent-thought models"). --math-only skips the demo tasks.

example:
  python tools/make_eval_tasks.py --output-dir demo_output/eval_tasks --num-docs 100
  python tools/make_eval_tasks.py --math-only --output-dir eval_math \\
      --math-data gsm8k=/data/gsm8k/test.jsonl --latent-max-gen-toks 1024
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
    parser.add_argument("--math-data", action="append", default=[], metavar="STYLE=JSONL",
                        help="Write the GSM8K (STYLE gsm8k) or MATH (STYLE math) baseline and "
                        "latent tasks reading this local test file; JSONL 'sample' uses the "
                        "built-in sample (repeatable).")
    parser.add_argument("--math-exemplars", action="append", default=[],
                        metavar="STYLE=JSONL", help="Few-shot exemplars from the first "
                        "records of this file instead of lm-eval's (repeatable).")
    parser.add_argument("--math-num-fewshot", type=int, default=None,
                        help="Exemplars per prompt. Default 8 (gsm8k), 4 (math).")
    parser.add_argument("--max-gen-toks", type=int, default=None,
                        help="max_gen_toks of the math tasks. Default: the backend's.")
    parser.add_argument("--latent-max-gen-toks", type=int, default=None,
                        help="max_gen_toks of the *_latent tasks (latent + answer). Default: "
                        "--max-gen-toks.")
    parser.add_argument("--math-only", action="store_true",
                        help="Write only the --math-data tasks, not the demo tasks.")
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
        math_data = dict(spec.split("=", 1) for spec in args.math_data)
        math_exemplars = dict(spec.split("=", 1) for spec in args.math_exemplars)
    except ValueError:
        print("error: --math-data and --math-exemplars take STYLE=JSONL", file=sys.stderr)
        return 1
    if args.math_only and not math_data:
        print("error: --math-only needs --math-data", file=sys.stderr)
        return 1
    try:
        written = {}
        if math_data:
            from megatron_latent.evaluation.math_tasks import write_math_tasks

            written.update(write_math_tasks(
                args.output_dir, math_data, math_exemplars, args.math_num_fewshot,
                args.max_gen_toks, args.latent_max_gen_toks))
        if args.math_only:
            for name, path in written.items():
                print(f"Wrote {name}: {path}")
            print(f"Use: --include_path {os.path.abspath(args.output_dir)} --tasks "
                  + ",".join(written))
            return 0
        if args.input:
            docs, source = read_documents(args.input), f"`{args.input}`"
        else:
            docs = validation_documents(args.valid_plays, args.split_seed)
            source = (f"the demo corpus's validation plays (--valid-plays {args.valid_plays}, "
                      f"--split-seed {args.split_seed}; the defaults are `make demo`'s split)")
        standard_written = write_standard_tasks(args.output_dir, standard)
        written.update(write_tasks(args.output_dir, options, docs, source))
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
