#!/usr/bin/env python
"""Small-scale fidelity of thought memory against plain next-token training (a report, not a
test).

On the demo corpus (Shakespeare scenes; validation = held-out plays) one small Pythia shape is
trained twice per seed: with `--method thought-memory` on the sentence-level dataset
(`--split-sentences`), and with `--method vanilla` on the document-level dataset of the same
text and tokenizer. The table shows validation perplexity on content tokens, mean ± spread
over seeds, each seed's value, the tokens and the training FLOPs of each run.

Equal tokens: both runs read the same number of text (content) tokens. Thought memory's
consumed tokens also count its row markers (BOS and EOS on every sentence row, EOD on a
document's last row); those are not text, so they are left out. Its content tokens are
counted exactly by replaying the trainer's batches (same streams, curriculum, packing and
seed). Vanilla's consumed tokens are iterations x global batch x sequence length, of which
the one EOD per document (--append-eod) is not text: its iterations are chosen so that
its text tokens (consumed tokens x the dataset's text fraction) match thought memory's.

Perplexity without special tokens: thought memory's `validation` set scores content targets
only (no BOS/EOS/EOD targets; `all-targets` adds them and is shown for reference), over
every validation document, uncut. Vanilla is trained and scored with --eod-mask-loss, so its
EOD targets are not scored either; its validation reads the first eval-iters x batch
samples of the shuffled held-out text (as close to all of it as whole batches allow). The
two see different context: vanilla a window of --seq-length tokens, thought memory the
current sentence plus the memory of earlier sentence vectors of the same document.

    python benchmarks/thought_memory_fidelity.py                  # prepares the data if missing
    python benchmarks/thought_memory_fidelity.py --seeds 1234 2 --iterations 400
    python benchmarks/thought_memory_fidelity.py --device cuda --iterations 2000
    python benchmarks/thought_memory_fidelity.py --seeds 2 --runs vanilla   # one run; rest reused
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
TOKENIZER = ["--tokenizer-type", "SentencePieceTokenizer"]


def prepare_data(data: Path) -> None:
    """Demo corpus -> tokenizer -> document- and sentence-level datasets of both splits, as
    `make demo` prepares its data; every finished output is reused."""
    data.mkdir(parents=True, exist_ok=True)
    python, tools = sys.executable, ROOT / "tools"
    steps = [
        (data / "shakespeare_valid.jsonl",
         [python, tools / "prepare_demo_corpus.py", "--output-dir", data]),
        (data / "tokenizer.model",
         [python, tools / "train_tokenizer.py", "--input", data / "shakespeare_train.jsonl",
          "--output-prefix", data / "tokenizer", "--vocab-size", "4096"]),
    ]
    for split in ("train", "valid"):
        for kind, extra in (("document", []), ("sentence", ["--split-sentences"])):
            steps.append((data / f"{split}_text_{kind}.idx", [
                python, tools / "preprocess_data.py", "--input", data / f"shakespeare_{split}.jsonl",
                "--output-prefix", data / split, *TOKENIZER,
                "--tokenizer-model", data / "tokenizer.model", "--append-eod", "--workers", "2",
                *extra]))
    for done, command in steps:
        if not done.exists():
            print(f"  preparing {done.name}", flush=True)
            subprocess.run([str(c) for c in command], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)


def data_flags(data: Path, kind: str) -> list[str]:
    """Training and validation flags of the `document` or `sentence` datasets."""
    return ["--train-data-path", str(data / f"train_text_{kind}"),
            "--valid-data-path", str(data / f"valid_text_{kind}"),
            *TOKENIZER, "--tokenizer-model", str(data / "tokenizer.model")]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_pretrain(out: Path, flags: list[str], quiet: bool = True) -> list[dict]:
    """One pretrain.py run writing ``out/metrics.jsonl``; returns its records."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = out / "train.log"
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *flags,
                                 "--metrics-file", str(metrics)], cwd=ROOT, env=env,
                                stdout=handle if quiet else None, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"pretrain.py failed ({result.returncode}); {log}:\n{tail}")
    return read_metrics(metrics)


def parse(flags: list[str]):
    """(RunConfig, method options) of pretrain.py flags, parsed by the project's parser."""
    sys.path.insert(0, str(ROOT))
    from megatron_latent.arguments import method_options, parse_run_config

    run, _ = parse_run_config(flags)
    return run, method_options(run)


def thought_memory_token_counts(flags: list[str], iterations: int) -> dict:
    """Tokens the trainer consumes in `iterations` steps (replaying its batches), split into
    content and markers, and the validation set's batches and content tokens."""
    from megatron_latent.methods.thought_memory.streams import SentenceRows, StreamBatcher
    from megatron_latent.training.data import build_run_tokenizer

    run, options = parse(flags)
    tokenizer = build_run_tokenizer(run)
    vocab, eod = int(tokenizer.vocab_size), getattr(tokenizer, "eod", None)
    train = SentenceRows.from_dataset(run.data.train_data_path[0], options.max_content,
                                      eod_id=eod)
    valid = SentenceRows.from_dataset(run.data.valid_data_path[0], options.max_content,
                                      eod_id=eod)
    row_content = numpy_cumsum(train.length)
    content = total = slots = epoch = 0
    per_batch: list[tuple[int, int]] = []  # (non-pad tokens, content tokens) per step
    left = iterations
    while left:
        layout = options.layout(vocab, max_sentences=options.stream_length_at(epoch))
        batcher = StreamBatcher(train, layout, seed=run.training.seed + epoch,
                                token_budget=options.token_budget, cut=True,
                                window=options.pack_window)
        streams = batcher.streams
        for batch in batcher.global_batches[:left]:
            first, rows = streams.first[batch], streams.rows[batch]
            per_batch.append((int(streams.tokens[batch].sum()),
                              int((row_content[first + rows] - row_content[first]).sum())))
            total, content = total + per_batch[-1][0], content + per_batch[-1][1]
            slots += len(batch) * int(rows.max()) * options.L  # padded [streams, S_max, L]
        left -= min(left, len(batcher))
        epoch += 1
    layout = options.layout(vocab, max_sentences=options.stream_length)
    valid_batches = StreamBatcher(valid, layout, seed=run.training.seed,
                                  token_budget=options.token_budget, cut=False,
                                  window=options.pack_window)
    return {"tokens": total, "content_tokens": content, "marker_tokens": total - content,
            "row_slots": slots, "per_batch": per_batch,
            "epochs": epoch, "valid_batches": len(valid_batches),
            "valid_content_tokens": int(valid.length.sum())}


def numpy_cumsum(lengths):
    import numpy

    return numpy.concatenate([[0], numpy.cumsum(lengths)]).astype(numpy.int64)


def text_fraction(prefix: str) -> float:
    """Share of a document dataset's tokens that are text (not the EOD closing each one)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    total = int(dataset.sequence_lengths.sum())
    return (total - (len(dataset.document_indices) - 1)) / total


def dataset_tokens(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # keeps the memory map open while it is read
    return int(dataset.sequence_lengths.sum())


def training_flops(flags: list[str], tokens_or_slots: int) -> float:
    """Training FLOPs of a run: the trainer's per-token (thought memory: per row slot) count
    times the tokens (slots) it executed."""
    from megatron_latent.methods.registry import get_method
    from megatron_latent.training import trainer

    run, options = parse(flags)
    run.model.vocab_size = trainer.build_run_tokenizer(run).vocab_size
    return trainer.training_flops_per_token(run, get_method(run.method), options) * \
        tokens_or_slots


def cached(out: Path, command: list[str]) -> dict | None:
    saved = out / "result.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        if previous.get("command") == command:
            return {**previous["result"], "reused": True}
    return None


def store(out: Path, command: list[str], result: dict) -> None:
    partial = out / "result.json.partial"
    partial.write_text(json.dumps({"command": command, "result": result}, indent=1))
    partial.replace(out / "result.json")


def summarize(records: list[dict], started: float) -> dict:
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "validation"]
    every = [r for r in records if r["kind"] == "validation/all-targets"]
    if not valid:
        raise SystemExit("a run finished without a validation record")
    out = {"valid_loss": valid[-1]["lm_loss"], "valid_ppl": math.exp(valid[-1]["lm_loss"]),
           "tokens": int(train[-1]["consumed_tokens"]), "iterations": train[-1]["iteration"],
           "minutes": (time.time() - started) / 60}
    if every:
        out["valid_ppl_all_targets"] = math.exp(every[-1]["lm_loss"])
    return out


def common_flags(args, seed: int, iterations: int) -> list[str]:
    # A log interval that divides the iterations, so the last step's tokens are logged.
    return ["--log-interval", str(math.gcd(50, iterations)),"--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.num_attention_heads),
            "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-decay-style", "cosine",
            "--lr-warmup-fraction", "0.02", "--weight-decay", "0.01", "--clip-grad", "1.0",
            "--adam-beta2", "0.99", "--num-workers", "0",
            "--seed", str(seed), "--device", args.device]


def thought_memory_flags(args, data: Path, seed: int) -> list[str]:
    # One pass or less over the data: the EOS weight drops after 1/50 of the training
    # tokens (the paper's first of 50 epochs), keyed to consumed tokens.
    epoch_tokens = max(1, args.iterations * args.token_budget // 50)
    return [*common_flags(args, seed, args.iterations), *data_flags(data, "sentence"),
            "--method", "thought-memory",
            "--micro-batch-size", str(args.tm_micro_batch_size),
            "--global-batch-size", str(args.tm_micro_batch_size),
            "--train-iters", str(args.iterations), "--tm-token-budget", str(args.token_budget),
            "--tm-max-content", str(args.max_content),
            "--tm-stream-length", str(args.stream_length),
            "--tm-memory-size", str(args.memory_size),
            "--tm-schedule-epoch-tokens", str(epoch_tokens),
            "--eval-interval", str(args.iterations),
            "--eval-iters", str(args.eval_batches or 1_000_000)]  # 0: every validation batch


def vanilla_flags(args, data: Path, seed: int, iterations: int, eval_iters: int) -> list[str]:
    return [*common_flags(args, seed, iterations), *data_flags(data, "document"),
            "--method", "vanilla",
            "--seq-length", str(args.seq_length), "--micro-batch-size", "8",
            "--global-batch-size", str(args.global_batch_size),
            "--train-iters", str(iterations), "--eod-mask-loss",
            "--eval-interval", str(iterations), "--eval-iters", str(eval_iters)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/thought_memory_demo",
                        help="work dir of the corpus, tokenizer and datasets (reused)")
    parser.add_argument("--output-dir", default="runs/thought_memory_fidelity")
    parser.add_argument("--output", default=None,
                        help="JSON report (default: <output-dir>/fidelity.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 2])
    parser.add_argument("--runs", nargs="+", choices=["thought-memory", "vanilla"], default=[],
                        help="retrain these even when finished (default: a finished run with "
                             "an unchanged command is reused, an interrupted sweep resumes)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--iterations", type=int, default=200,
                        help="thought-memory training iterations, ~3,500 text tokens each at "
                             "the default budget (vanilla's follow from the tokens); on 2 CPU "
                             "cores the default takes about an hour per seed")
    parser.add_argument("--token-budget", type=int, default=4096,
                        help="thought memory: non-pad tokens per global batch")
    parser.add_argument("--max-content", type=int, default=64)
    parser.add_argument("--stream-length", type=int, default=30)
    parser.add_argument("--memory-size", type=int, default=40)
    parser.add_argument("--tm-micro-batch-size", type=int, default=8,
                        help="thought memory: streams per micro-batch")
    parser.add_argument("--eval-batches", type=int, default=0,
                        help="validation batches per run (default 0: thought memory every "
                             "packed batch of the held-out documents, vanilla as many whole "
                             "batches as the held-out text fills); for quick checks")
    parser.add_argument("--seq-length", type=int, default=256, help="vanilla context")
    parser.add_argument("--global-batch-size", type=int, default=16, help="vanilla sequences")
    args = parser.parse_args()
    data = (ROOT / args.data_dir).resolve()
    out_dir = (ROOT / args.output_dir).resolve()
    prepare_data(data)
    fraction = text_fraction(str(data / "train_text_document"))
    valid_tokens = dataset_tokens(str(data / "valid_text_document"))
    # Whole batches of the held-out text, each sample seq-length + 1 tokens.
    vanilla_eval = args.eval_batches or \
        max(1, (valid_tokens - 1) // args.seq_length // args.global_batch_size)

    results: dict[str, list[dict]] = {"thought-memory": [], "vanilla": []}
    for seed in args.seeds:
        tm_flags = thought_memory_flags(args, data, seed)
        counts = thought_memory_token_counts(tm_flags, args.iterations)
        per_step = args.global_batch_size * args.seq_length
        vanilla_iters = max(1, round(counts["content_tokens"] / (per_step * fraction)))
        va_flags = vanilla_flags(args, data, seed, vanilla_iters, vanilla_eval)
        for name, flags in (("thought-memory", tm_flags), ("vanilla", va_flags)):
            target = out_dir / f"{name}_seed{seed}"
            result = None if name in args.runs else cached(target, flags)
            if result is None:
                started = time.time()
                records = run_pretrain(target, flags)
                result = summarize(records, started)
                if name == "thought-memory":
                    if result["tokens"] != counts["tokens"]:
                        print(f"  warning: replayed {counts['tokens']} tokens, the trainer "
                              f"logged {result['tokens']}")
                    result.update({k: v for k, v in counts.items() if k != "per_batch"},
                                  tokens=result["tokens"])
                    # Executed FLOPs: per row slot (padding included) x slots run.
                    result["flops"] = training_flops(flags, counts["row_slots"])
                else:
                    result["content_tokens"] = round(result["tokens"] * fraction)
                    result["flops"] = training_flops(flags, result["tokens"])
                store(target, flags, result)
            results[name].append({**result, "seed": seed})
            how = "reused" if result.get("reused") else f"{result['minutes']:.1f} min"
            print(f"  {name:<15} seed {seed}: valid ppl {result['valid_ppl']:.3f} ({how})",
                  flush=True)

    report(args, results, fraction, vanilla_eval)
    return 0


def report(args, results: dict[str, list[dict]], fraction: float, vanilla_eval: int) -> None:
    def mean_spread(values):
        mean = sum(values) / len(values)
        return mean, (max(values) - min(values)) / 2

    print(f"\nshape: {args.num_layers} layers, hidden {args.hidden_size}, "
          f"{args.num_attention_heads} heads; thought memory: {args.iterations} iterations, "
          f"budget {args.token_budget} tokens, S={args.stream_length}, M={args.memory_size}, "
          f"max content {args.max_content}; vanilla: seq {args.seq_length} x "
          f"{args.global_batch_size}, --eod-mask-loss, {vanilla_eval} eval iterations")
    header = (f"{'method':<15} {'valid ppl (content)':>20} {'per seed':>24} {'text tokens':>12} "
              f"{'all tokens':>11} {'train FLOPs':>11} {'FLOPs ratio':>11}")
    print(header)
    print("-" * len(header))
    base = sum(r["flops"] for r in results["vanilla"]) / max(len(results["vanilla"]), 1)
    summary = {}
    for name, rows in results.items():
        if not rows:
            continue
        # Mean of the seeds' log-perplexities, shown as a perplexity.
        losses = [r["valid_loss"] for r in rows]
        mean, spread = mean_spread(losses)
        ppl, ppl_spread = math.exp(mean), math.exp(mean) * spread
        seeds = " ".join(f"{r['valid_ppl']:.2f}" for r in rows)
        flops = sum(r["flops"] for r in rows) / len(rows)
        content = sum(r["content_tokens"] for r in rows) // len(rows)
        tokens = sum(r["tokens"] for r in rows) // len(rows)
        ratio = flops / base if base else float("nan")
        print(f"{name:<15} {ppl:>12.3f} ± {ppl_spread:<5.3f} {seeds:>24} {content:>12,} "
              f"{tokens:>11,} {flops:>11.3e} {ratio:>10.2f}x")
        summary[name] = {"valid_ppl": ppl, "spread": ppl_spread, "valid_loss": mean,
                         "per_seed": rows, "flops": flops, "flops_ratio": ratio,
                         "content_tokens": content, "tokens": tokens}
    every = [r["valid_ppl_all_targets"] for r in results["thought-memory"]
             if "valid_ppl_all_targets" in r]
    if every:
        print(f"thought memory, every target (EOS/EOD included): "
              f"{' '.join(f'{p:.2f}' for p in every)}")
    if summary.get("vanilla") and summary.get("thought-memory"):
        gap = summary["thought-memory"]["valid_ppl"] / summary["vanilla"]["valid_ppl"] - 1
        print(f"thought memory vs vanilla: {100 * gap:+.1f}% validation perplexity at equal "
              f"text tokens (the paper: 2-4% lower at 12M-50M tokens, 12 layers)")
    output = Path(args.output) if args.output else \
        (ROOT / args.output_dir).resolve() / "fidelity.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"args": vars(args), "vanilla_text_fraction": fraction,
                                  "results": summary}, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    sys.exit(main())
