#!/usr/bin/env python
"""Evaluate a checkpoint of any method with lm-evaluation-harness (offline, local tasks).

    python tools/evaluate.py --load ckpt/ --tasks my_mc,my_ppl --include-path tasks/ \\
        --output results.json --log-samples
    torchrun --nproc_per_node 4 tools/evaluate.py --load ckpt/ --tensor-model-parallel-size 2 \\
        --tasks hellaswag --include-path tasks/ --num-fewshot 0

Prints lm-eval's results table and writes them as JSON (--output). The model is the
checkpoint's own method (pondering passes included), at any TP size; under torchrun the
world is cut into TP groups and the data-parallel ranks split the requests. Runs with
HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 unless those are set.

lm-eval's own flags work too: given --model or --model_args, every argument goes to lm-eval's
CLI with the backend registered (``python -m megatron_latent.evaluation.cli`` is the same)::

    python tools/evaluate.py --model megatron_latent --model_args load=ckpt/,tp=1 \\
        --tasks my_mc --include_path tasks/ --output_path out/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--include-path", default=None, help="directory of task YAMLs")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=_number, default=None,
                        help="documents per task (a fraction if below 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--iteration", type=int, default=None, help="default: latest")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per forward (default: the run's seq length)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    parser.add_argument("--log-samples", action="store_true",
                        help="include every document's requests and responses in --output")
    parser.add_argument("--tokenizer-type", default=None)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    return parser.parse_args(argv)


def _write_json(path: str, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    from megatron_latent.fileio import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable,
                                       ensure_ascii=False))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == flag or a.startswith(flag + "=") for a in argv
           for flag in ("--model", "--model_args")):
        from megatron_latent.evaluation.cli import main as lm_eval_cli

        lm_eval_cli(argv)
        return 0
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        print("evaluate.py: error: --tasks names no task", file=sys.stderr)
        return 2
    if args.include_path and not os.path.isdir(args.include_path):
        print(f"evaluate.py: error: --include-path {args.include_path} is not a directory",
              file=sys.stderr)
        return 2

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("evaluate.py: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2

    from megatron_latent.config import ConfigError
    from megatron_latent.data.tokenizers import TokenizerError
    from megatron_latent.distributed import destroy_parallel
    from megatron_latent.evaluation.runner import evaluate

    overrides = {key: getattr(args, key) for key in
                 ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
                 if getattr(args, key)}
    extra = dict(overrides)
    if args.max_length:
        extra["max_length"] = args.max_length
    try:
        results = evaluate(
            args.load, tasks, iteration=args.iteration,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
            include_path=args.include_path, device=args.device, dtype=args.dtype,
            seed=args.seed, log_samples=True, extra_model_args=extra)
    except (ConfigError, ValueError, KeyError) as error:
        if isinstance(error, TokenizerError) and not overrides:
            error = (f"{error} (the tokenizer {args.load} records; give another with "
                     "--tokenizer-type and --tokenizer-model or --vocab-file/--merge-file)")
        message = " ".join(str(error).split())
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        destroy_parallel()
        return 2
    if results:
        from lm_eval.utils import make_table

        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        if args.output:
            if not args.log_samples:
                results = {k: v for k, v in results.items() if k != "samples"}
            _write_json(args.output, results)
            print(f"wrote {args.output}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
