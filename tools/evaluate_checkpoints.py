#!/usr/bin/env python
r"""Evaluate every checkpoint of a run with lm-eval tasks; resumable (docs/evaluation.md).

    python tools/evaluate_checkpoints.py runs/pythia-70m --tasks hellaswag,arc_easy \
        --include-path tasks/ --limit 500 --every 1000
    torchrun --nproc_per_node 2 tools/evaluate_checkpoints.py RUN_DIR --tasks ... \
        --tensor-model-parallel-size 2

Writes RUN_DIR/evals/iter_*.json (lm-eval's results schema plus iteration, consumed tokens,
train and held-out loss, fingerprints), samples_<task>_iter_*.jsonl and appends to
evals.jsonl. Checkpoints already evaluated with the same tasks and settings are skipped, so
an interrupted sweep is simply started again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _number_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected iteration numbers, got {text!r}") from error


def _limit(text: str) -> float | int:
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's --save directory")
    parser.add_argument("--tasks", required=True, action="append",
                        help="lm-eval task names, comma-separated (repeatable)")
    parser.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=_limit, default=None,
                        help="documents per task (a fraction below 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--output-dir", default=None, help="default: RUN_DIR/evals")
    parser.add_argument("--every", type=int, default=None,
                        help="only iterations that are multiples of N")
    parser.add_argument("--iterations", type=_number_list, action="extend", default=None,
                        help="only these iterations (comma- or space-separated)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--heldout-seed", type=int, default=None,
                        help="seed of the held-out slice the validation loss is computed on "
                        "(default: the run's own, as its training logs); give runs trained "
                        "with different seeds the same value to put them on one loss axis")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_latent.config import ConfigError
    from megatron_latent.evaluation.sweep import SweepSettings, sweep
    from megatron_latent.inference.loading import tool_device

    tasks = [t.strip() for group in args.tasks for t in group.split(",") if t.strip()]
    device = tool_device(args.device)
    settings = SweepSettings(tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                             include_path=args.include_path, seed=args.seed, dtype=args.dtype,
                             heldout_seed=args.heldout_seed)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        sweep(args.run_dir, settings, output_dir=args.output_dir, every=args.every,
              iterations=args.iterations, batch_size=args.batch_size,
              tensor_model_parallel_size=args.tensor_model_parallel_size, device=device,
              log=lambda line: print(line, flush=True) if rank0 else None)
    except ConfigError as error:
        print(f"evaluate_checkpoints.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
