#!/usr/bin/env python
"""Training throughput of thought memory against plain next-token training, same model shape,
same number of training (text) tokens, one invocation.

Both runs are pretrain.py processes on the demo corpus (thought memory on the sentence-level
dataset, vanilla on the document-level dataset of the same text), logging every iteration;
the first --warmup iterations of each are skipped and the rest timed from
`<run>/metrics.jsonl`. Text tokens are counted as in benchmarks/thought_memory_fidelity.py
(thought memory's BOS/EOS/EOD row markers and vanilla's EOD are not text); vanilla's
iterations are chosen so that it reads as many text tokens as thought memory.

FLOPs are the executed ones the trainer logs (tflops_per_device): vanilla 3 x
megatron_latent/flops.py per token; thought memory 3 x
megatron_latent/methods/thought_memory/flops.py per sentence-row slot, times streams x S_max x
L slots per step, padding included. Time per FLOP compares how well each run uses the
hardware (goal: thought memory <= 1.5 x vanilla); FLOPs per text token compares what each
spends on the same text.

    python benchmarks/thought_memory_throughput.py                  # small CPU shape
    python benchmarks/thought_memory_throughput.py --device cuda --bf16 --model pythia-160m \\
        --token-budget 65536 --global-batch-size 32 --seq-length 2048 \\
        --tm-micro-batch-size 32 --iterations 30 --warmup 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from thought_memory_fidelity import (  # noqa: E402
    ROOT,
    data_flags,
    prepare_data,
    run_pretrain,
    text_fraction,
    thought_memory_token_counts,
)

GOAL = 1.5


def shape_flags(args) -> list[str]:
    if args.model:
        return ["--model", args.model]
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.num_attention_heads)]


def common_flags(args, iterations: int) -> list[str]:
    return [*shape_flags(args), "--train-iters", str(iterations), "--lr", "1e-3",
            "--min-lr", "1e-4", "--lr-warmup-fraction", "0.1", "--weight-decay", "0.01",
            "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0",
            "--seed", str(args.seed), "--device", args.device,
            *(["--bf16"] if args.bf16 else [])]


def thought_memory_flags(args, data: Path) -> list[str]:
    return [*common_flags(args, args.iterations), *data_flags(data, "sentence"),
            "--method", "thought-memory", "--micro-batch-size", str(args.tm_micro_batch_size),
            "--global-batch-size", str(args.tm_micro_batch_size),
            "--tm-token-budget", str(args.token_budget), "--tm-max-content",
            str(args.max_content), "--tm-stream-length", str(args.stream_length),
            "--tm-memory-size", str(args.memory_size)]


def vanilla_flags(args, data: Path, iterations: int) -> list[str]:
    return [*common_flags(args, iterations), *data_flags(data, "document"),
            "--method", "vanilla", "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size)]


def timed(records: list[dict], warmup: int, text_tokens: list[float]) -> dict:
    """Totals over the logged iterations after `warmup` (log interval 1): time from tokens and
    tokens/s, executed FLOPs from TFLOP/s x time. `text_tokens[i]`: text tokens of step i."""
    train = [r for r in records if r["kind"] == "train"]
    if len(train) <= warmup:
        raise SystemExit(f"only {len(train)} iterations logged; need more than --warmup "
                         f"{warmup}")
    seconds = tokens = text = flops = 0.0
    previous = train[warmup - 1]["consumed_tokens"] if warmup else 0
    for r in train[warmup:]:
        step_tokens = r["consumed_tokens"] - previous
        previous = r["consumed_tokens"]
        step_seconds = step_tokens / r["tokens_per_second"]
        seconds += step_seconds
        tokens += step_tokens
        text += text_tokens[r["iteration"] - 1]
        flops += r["tflops_per_device"] * 1e12 * step_seconds
    iterations = len(train) - warmup
    return {"timed_iterations": iterations, "seconds": seconds, "tokens": tokens,
            "text_tokens": text, "flops": flops, "tokens_per_s": tokens / seconds,
            "text_tokens_per_s": text / seconds, "tflops": flops / seconds / 1e12,
            "s_per_pflop": seconds / flops * 1e15, "ms_per_iteration": 1e3 * seconds / iterations,
            "flops_per_text_token": flops / text,
            "consumed_tokens": int(train[-1]["consumed_tokens"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/thought_memory_demo",
                        help="work dir of the corpus, tokenizer and datasets (reused)")
    parser.add_argument("--output-dir", default="runs/thought_memory_throughput",
                        help="the two runs' logs and metrics")
    parser.add_argument("--output", default=None,
                        help="JSON report (default: <output-dir>/throughput.json)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 (GPU)")
    shape = parser.add_argument_group("model shape (both runs)")
    shape.add_argument("--model", default=None, help="a preset (e.g. pythia-160m) instead of "
                       "the three shape flags")
    shape.add_argument("--num-layers", type=int, default=4)
    shape.add_argument("--hidden-size", type=int, default=128)
    shape.add_argument("--num-attention-heads", type=int, default=4)
    tm = parser.add_argument_group("thought memory")
    tm.add_argument("--iterations", type=int, default=12,
                    help="thought-memory iterations (vanilla's follow from the text tokens)")
    tm.add_argument("--token-budget", type=int, default=2048,
                    help="non-pad tokens per global batch")
    tm.add_argument("--tm-micro-batch-size", type=int, default=8, help="streams per micro-batch")
    tm.add_argument("--max-content", type=int, default=64)
    tm.add_argument("--stream-length", type=int, default=30)
    tm.add_argument("--memory-size", type=int, default=40)
    va = parser.add_argument_group("vanilla")
    va.add_argument("--seq-length", type=int, default=256)
    va.add_argument("--global-batch-size", type=int, default=8)
    va.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3,
                        help="first iterations of each run left out of the timing")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    data = (ROOT / args.data_dir).resolve()
    out = (ROOT / args.output_dir).resolve()
    prepare_data(data)

    tm_flags = thought_memory_flags(args, data)
    counts = thought_memory_token_counts(tm_flags, args.iterations)
    fraction = text_fraction(str(data / "train_text_document"))
    per_step = args.global_batch_size * args.seq_length
    vanilla_iters = max(args.warmup + 1, round(counts["content_tokens"] / (per_step * fraction)))
    va_flags = vanilla_flags(args, data, vanilla_iters)

    print(f"thought memory: {args.iterations} iterations, {counts['content_tokens']:,} text "
          f"tokens; vanilla: {vanilla_iters} iterations of {per_step:,} tokens", flush=True)
    print("  training thought memory ...", flush=True)
    tm = timed(run_pretrain(out / "thought-memory", tm_flags), args.warmup,
               [content for _, content in counts["per_batch"]])
    print("  training vanilla ...", flush=True)
    va = timed(run_pretrain(out / "vanilla", va_flags), args.warmup,
               [per_step * fraction] * vanilla_iters)
    if tm["consumed_tokens"] != counts["tokens"]:
        print(f"warning: replayed {counts['tokens']} tokens, the trainer logged "
              f"{tm['consumed_tokens']}")

    shape = args.model or (f"{args.num_layers} layers, hidden {args.hidden_size}, "
                           f"{args.num_attention_heads} heads")
    print(f"\n{shape}, {args.device}{' bf16' if args.bf16 else ''}; thought memory rows L="
          f"{args.max_content + 3}, S={args.stream_length}, M={args.memory_size}, budget "
          f"{args.token_budget}; vanilla seq {args.seq_length} x {args.global_batch_size}; "
          f"timing after {args.warmup} warm-up iterations")
    rows = [("timed iterations", "timed_iterations", "{:.0f}"),
            ("ms per iteration", "ms_per_iteration", "{:.1f}"),
            ("tokens/s (markers/EOD incl.)", "tokens_per_s", "{:,.0f}"),
            ("text tokens/s", "text_tokens_per_s", "{:,.0f}"),
            ("executed TFLOP/s", "tflops", "{:.4f}"),
            ("time per PFLOP (s)", "s_per_pflop", "{:.2f}"),
            ("training FLOPs per text token", "flops_per_text_token", "{:.4g}")]
    header = f"{'':31} {'vanilla':>14} {'thought memory':>15} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for label, key, fmt in rows:
        ratio = tm[key] / va[key] if va[key] else float("nan")
        print(f"{label:31} {fmt.format(va[key]):>14} {fmt.format(tm[key]):>15} {ratio:>6.2f}x")
    per_flop = tm["s_per_pflop"] / va["s_per_pflop"]
    verdict = "met" if per_flop <= GOAL else "NOT met"
    print(f"time per FLOP: thought memory / vanilla = {per_flop:.2f} (goal <= {GOAL}: {verdict})")
    print(f"text tokens/s: thought memory / vanilla = "
          f"{tm['text_tokens_per_s'] / va['text_tokens_per_s']:.2f}")
    output = Path(args.output) if args.output else out / "throughput.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "args": vars(args), "vanilla": va, "thought_memory": tm,
        "thought_memory_counts": {k: v for k, v in counts.items() if k != "per_batch"},
        "vanilla_iterations": vanilla_iters, "time_per_flop_ratio": per_flop,
        "text_tokens_per_s_ratio": tm["text_tokens_per_s"] / va["text_tokens_per_s"],
        "goal_time_per_flop_ratio": GOAL, "goal_met": per_flop <= GOAL}, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    sys.exit(main())
