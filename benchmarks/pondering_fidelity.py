#!/usr/bin/env python
"""Small-scale fidelity of pondering (a report, not a test).

On the demo corpus (Shakespeare, validation = held-out plays), trains one small Pythia shape
with plain next-token training and with pondering k=1 and k=3, on the same tokens in the same
order (same seed, same data, same number of iterations), and prints validation loss and
perplexity side by side with the training FLOPs each run spent. The pondering runs use the
official PonderingLM Pythia recipe's embedding scaling (--ponder-scale-embeds: E_0 and the
mixing table times sqrt(hidden)); multiply-steps stays off, as in the official 70M/160M
scripts.

    python benchmarks/pondering_fidelity.py                # prepares data/demo if missing
    python benchmarks/pondering_fidelity.py --iterations 600 --seeds 1 2
    python benchmarks/pondering_fidelity.py --seeds 2 --runs k3     # one run; others are reused
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare_data(data: Path) -> None:
    """Corpus -> tokenizer -> indexed datasets, as `make demo` does (skipped if present)."""
    if (data / "valid_text_document.idx").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    python, tools = sys.executable, ROOT / "tools"
    commands = [
        [python, tools / "prepare_demo_corpus.py", "--output-dir", data],
        [python, tools / "train_tokenizer.py", "--input", data / "shakespeare_train.jsonl",
         "--output-prefix", data / "tokenizer", "--vocab-size", "4096"],
    ] + [
        [python, tools / "preprocess_data.py", "--input", data / f"shakespeare_{split}.jsonl",
         "--output-prefix", data / split, "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", data / "tokenizer.model", "--append-eod", "--workers", "2"]
        for split in ("train", "valid")
    ]
    for command in commands:
        subprocess.run([str(c) for c in command], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)


def train(data: Path, out: Path, method: list[str], seed: int, args) -> dict:
    """One training run; its result is kept in ``out/result.json`` with the command that made
    it, and a later call with the same command reuses it (an interrupted sweep resumes)."""
    metrics = out / "metrics.jsonl"
    saved = out / "result.json"
    command = [
        sys.executable, ROOT / "pretrain.py",
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
        "--train-data-path", data / "train_text_document",
        "--valid-data-path", data / "valid_text_document",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data / "tokenizer.model",
        "--micro-batch-size", "8", "--global-batch-size", str(args.global_batch_size),
        "--train-iters", str(args.iterations), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
        "--lr-warmup-fraction", "0.02", "--weight-decay", "0.01",
        "--eval-interval", str(args.iterations), "--eval-iters", str(args.eval_iters),
        "--log-interval", "50", "--num-workers", "0", "--seed", str(seed),
        "--metrics-file", metrics, *method,
    ]
    command = [str(c) for c in command]
    if saved.exists():
        previous = json.loads(saved.read_text())
        if previous.get("command") == command[1:]:
            return {**previous["result"], "reused": True}
    if metrics.exists():
        metrics.unlink()
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "validation"][-1]
    train_records = [r for r in records if r["kind"] == "train"]
    result = {"valid_loss": valid["lm_loss"], "tokens": train_records[-1]["consumed_tokens"],
              "minutes": (time.time() - started) / 60}
    partial = saved.with_suffix(".json.partial")
    partial.write_text(json.dumps({"command": command[1:], "result": result}))
    partial.replace(saved)
    return result


def training_flops(method: list[str], args) -> float:
    from megatron_latent.arguments import method_options, parse_run_config
    from megatron_latent.methods.registry import get_method
    from megatron_latent.training.trainer import training_flops_per_token

    run, _ = parse_run_config([
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads),
        "--seq-length", str(args.seq_length), "--vocab-size", "4096", "--mock-data",
        "--train-iters", "1", *method])
    return training_flops_per_token(run, get_method(run.method), method_options(run))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/demo")
    parser.add_argument("--output-dir", default="runs/pondering_fidelity")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-iters", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--runs", nargs="+", choices=["vanilla", "k1", "k3"],
                        default=["vanilla", "k1", "k3"],
                        help="which runs to train (finished runs are reused from --output-dir "
                             "when their command is unchanged)")
    args = parser.parse_args()
    data = (ROOT / args.data_dir).resolve()
    out = (ROOT / args.output_dir).resolve()
    prepare_data(data)
    ponder = ["--method", "pondering", "--ponder-scale-embeds"]
    every_run = {"vanilla": ("vanilla", ["--method", "vanilla"]),
                 "k1": ("pondering k=1", [*ponder, "--ponder-steps", "1"]),
                 "k3": ("pondering k=3", [*ponder, "--ponder-steps", "3"])}
    runs = [every_run[key] for key in ("vanilla", "k1", "k3") if key in args.runs]
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    for seed in args.seeds:
        for name, method in runs:
            target = out / f"{name.replace(' ', '_').replace('=', '')}_seed{seed}"
            target.mkdir(parents=True, exist_ok=True)
            result = train(data, target, method, seed, args)
            results[name].append(result)
            how = "reused" if result.get("reused") else f"{result['minutes']:.1f} min"
            print(f"  {name:<14} seed {seed}: valid loss {result['valid_loss']:.4f} ({how})",
                  flush=True)

    base_flops = training_flops(every_run["vanilla"][1], args)
    shape = (f"{args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} "
             f"heads, seq {args.seq_length}, vocab 4096")
    print(f"\nPythia shape: {shape}; {args.iterations} iterations x {args.global_batch_size} "
          f"sequences = {results[runs[0][0]][0]['tokens']:,} training tokens per run; "
          f"seeds {args.seeds}; pondering with --ponder-scale-embeds (official recipe)")
    print(f"{'run':<15} {'valid loss':>11} {'valid ppl':>10} {'train FLOPs/token':>18} "
          f"{'vs vanilla':>10}")
    for name, method in runs:
        losses = [r["valid_loss"] for r in results[name]]
        mean = sum(losses) / len(losses)
        spread = (max(losses) - min(losses)) / 2 if len(losses) > 1 else 0.0
        flops = training_flops(method, args)
        loss_text = f"{mean:.4f}" + (f"±{spread:.4f}" if spread else "")
        print(f"{name:<15} {loss_text:>11} {math.exp(mean):>10.2f} {flops:>18.4g} "
              f"{flops / base_flops:>9.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    sys.exit(main())
