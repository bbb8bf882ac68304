"""Cost of pondering against the plain model, measured in one run on the same model and batch.

Prints a table: training step time (forward + backward + AdamW step) of pondering over the
plain model, next to the ratio the FLOPs formulas predict, and decoding throughput of the plain
model, cached pondering and uncached pondering (full-prefix recomputation per token).

    python benchmarks/pondering_overhead.py [--model tiny] [--steps 3] [--iters 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_latent.config import get_preset  # noqa: E402
from megatron_latent.distributed import ParallelConfig, initialize_parallel  # noqa: E402
from megatron_latent.inference import GenerationConfig, generate  # noqa: E402
from megatron_latent.methods.pondering import PonderingOptions  # noqa: E402
from megatron_latent.methods.registry import get_method  # noqa: E402


def build(method: str, config, options, seed: int = 1234):
    torch.manual_seed(seed)
    spec = get_method(method)
    config = spec.prepare_model_config(config, options)
    return spec.build_model(config, None, torch.device("cpu"), options), config


def time_training(models: dict, ids, labels, iters: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of one optimizer step per model on a fixed batch. The models take turns
    step by step, so background load falls on all of them alike."""
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
        for name, model in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(warmup + iters):
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            model(ids, labels=labels).mean().backward()
            optimizers[name].step()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_decoding(model, prompts, new_tokens: int, use_cache: bool) -> float:
    """Generated tokens per second (greedy, whole batch)."""
    config = GenerationConfig(max_new_tokens=new_tokens, greedy=True)
    generate(model, [p[:4] for p in prompts], GenerationConfig(max_new_tokens=2, greedy=True),
             use_cache=use_cache)  # warm-up
    start = time.perf_counter()
    out = generate(model, prompts, config, use_cache=use_cache)
    elapsed = time.perf_counter() - start
    return sum(len(t) for t in out) / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--steps", type=int, default=3, help="pondering steps k")
    parser.add_argument("--top-k", type=int, default=100,
                        help="N of the extra top-N row (0 skips it)")
    parser.add_argument("--batch", type=int, default=None,
                        help="micro batch (default: the preset's)")
    parser.add_argument("--iters", type=int, default=10, help="timed training steps")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    initialize_parallel(ParallelConfig(), torch.device("cpu"))

    preset = get_preset(args.model)
    base = preset.model_config()
    batch = args.batch or preset.recipe.micro_batch_size
    seq = base.seq_length
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.vocab_size, (batch, seq + 1), generator=generator)
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    variants = [("vanilla", "vanilla", None),
                (f"pondering k={args.steps}", "pondering", PonderingOptions(steps=args.steps))]
    if args.top_k:
        variants.append((f"pondering k={args.steps} top-{args.top_k}", "pondering",
                         PonderingOptions(steps=args.steps, top_k=args.top_k)))

    print(f"model {args.model}: {base.num_layers} layers, hidden {base.hidden_size}, vocab "
          f"{base.padded_vocab_size()}, batch {batch} x seq {seq}, "
          f"{torch.get_num_threads()} CPU threads")
    print()
    print(f"{'training step':34s} {'ms/step':>9s} {'ratio':>7s} {'FLOPs ratio':>12s} "
          f"{'time/FLOPs':>11s}")
    models, flops = {}, {}
    for name, method, options in variants:
        models[name], config = build(method, base, options)
        flops[name] = get_method(method).forward_flops_per_token(config, options, seq, 1)
    seconds = time_training(models, ids, labels, args.iters)
    reference = variants[0][0]
    for name, _, _ in variants:
        ratio = seconds[name] / seconds[reference]
        flops_ratio = flops[name] / flops[reference]
        print(f"{name:34s} {1e3 * seconds[name]:9.1f} {ratio:7.2f} {flops_ratio:12.2f} "
              f"{ratio / flops_ratio:11.2f}")
    passes = args.steps + 1
    print(f"(ideal by passes alone: {passes:.1f}; the FLOPs ratio adds the k mixing matmuls "
          f"of 2·V·h per token)")

    print()
    prompts = torch.randint(0, base.vocab_size, (batch, args.prompt_length),
                            generator=generator).tolist()
    print(f"decoding: batch {batch}, prompt {args.prompt_length}, {args.new_tokens} new tokens, "
          f"greedy")
    print(f"{'decoding':34s} {'tokens/s':>9s}")
    rows = [("vanilla (cached)", variants[0][0], True),
            (f"pondering k={args.steps} (cached)", variants[1][0], True),
            (f"pondering k={args.steps} (uncached)", variants[1][0], False)]
    for label, name, cache in rows:
        rate = time_decoding(models[name], prompts, args.new_tokens, cache)
        print(f"{label:34s} {rate:9.1f}")


if __name__ == "__main__":
    main()
