#!/usr/bin/env python
r"""Downstream scores against pretraining loss, across checkpoints and runs (docs/evaluation.md).

    python tools/loss_perspective.py runs/pythia-70m runs/pondering-70m --metric acc \
        --output-dir reports/loss_perspective

Reads each run's evals/iter_*.json (tools/evaluate_checkpoints.py), pools the checkpoints of
all runs per task and writes loss_perspective.md (table), loss_perspective.json (Spearman and
Pearson correlations, the loss threshold η per task) and <task>_<metric>.png. Runs with
different tokenizer or loss-data fingerprints are refused unless --force.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", metavar="RUN_DIR", nargs="+",
                        help="a run directory (with evals/) or an evals directory")
    parser.add_argument("--tasks", action="append", default=None,
                        help="tasks to analyse, comma-separated (default: every task found)")
    parser.add_argument("--metric", default="acc",
                        help="metric, optionally with its filter: acc, acc_norm, brier, "
                             "ccp, acc,none (default: acc)")
    parser.add_argument("--x", choices=["valid_loss", "train_loss"], default="valid_loss",
                        help="x-axis (default: held-out loss)")
    parser.add_argument("--valid-dataset", default="validation",
                        help="which held-out loss with --x valid_loss (default: validation, "
                             "the run's whole validation blend)")
    parser.add_argument("--output-dir", default=None,
                        help="default: RUN_DIR/evals for one run; required for several")
    parser.add_argument("--force", action="store_true",
                        help="put runs with different fingerprints on one axis (labelled)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_latent.config import ConfigError
    from megatron_latent.evaluation.analysis import analyse

    output_dir = args.output_dir
    if output_dir is None:
        if len(args.runs) > 1:
            print("loss_perspective.py: error: give --output-dir when comparing several runs",
                  file=sys.stderr)
            return 2
        run = args.runs[0]
        output_dir = run if os.path.basename(run.rstrip("/")) == "evals" else \
            os.path.join(run, "evals")
    tasks = [t.strip() for group in args.tasks for t in group.split(",") if t.strip()] \
        if args.tasks else None
    try:
        summary = analyse(args.runs, output_dir, tasks=tasks, metric=args.metric, x=args.x,
                          valid_dataset=args.valid_dataset, force=args.force)
    except ConfigError as error:
        print(f"loss_perspective.py: error: {error}", file=sys.stderr)
        return 2
    for task, entry in summary["tasks"].items():
        eta, corr = entry["eta"], entry["correlations"]
        eta_text = "none" if eta["eta"] is None else f"{eta['eta']:.4f}"
        rho = "n/a" if corr["spearman"] is None else f"{corr['spearman']:.3f}"
        print(f"{task} {entry['metric']}: eta {eta_text} ({eta['status']}, "
              f"{eta['n_checkpoints']} checkpoints), Spearman {rho}")
    if summary["forced"]:
        print("forced: " + "; ".join(summary["forced"]))
    print(f"wrote {output_dir}/loss_perspective.md, loss_perspective.json and "
          f"{len(summary['tasks'])} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
