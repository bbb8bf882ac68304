#!/usr/bin/env python
"""Training throughput of concepts (CoCoMix) against vanilla training, same model shape, same
batches, one invocation.

Set-up (in this process, under --work-dir): a synthetic token dataset and a word-level
tokenizer of its ids; a vanilla teacher of the student's shape trained for --teacher-iters and
saved; a random TopK SAE on the teacher's hidden size (C = --num-concepts latents, k =
--sae-k); offline labels of the whole dataset by tools/label_concepts.py (teacher layer
--teacher-layer, windows of --seq-length).

Three runners, each a Trainer set up from pretrain.py flags (same shape, seq, micro/global
batch, data, split and seed, so the same tokens step by step):
  vanilla                  --method vanilla
  concepts offline         --method concepts --concept-labels <labels>
  concepts online          --method concepts --concept-sae <sae> --concept-teacher-load
                           <teacher> --concept-teacher-layer <layer>
A timed step is what Trainer.train does per iteration: the next global batch from the
trainer's data, Engine.train_step (forward, backward, optimizer) and the LR scheduler step.
The runners take turns step by step, so background load falls on all of them alike; the first
--warmup steps of each are dropped and the median of the rest is reported.

FLOPs per token are the trainer's own count (training_flops_per_token: 3 x the method's
forward_flops_per_token). The online runner's count includes the teacher's work (forward,
input-gradient backward above the hook, SAE encode and attribution): flops.py adds a third of
it to the forward, so 3 x is the whole. Goals: offline labels cost no more time than their
FLOPs share (time ratio <= FLOPs ratio against vanilla), and online labels cost well above
offline (online / offline time ratio).

    python benchmarks/concepts_throughput.py                        # small CPU shape
    python benchmarks/concepts_throughput.py --device cuda --bf16 --model pythia-160m \\
        --vocab-size 50277 --seq-length 2048 --num-concepts 32768 --micro-batch-size 8 \\
        --global-batch-size 32 --iterations 30 --warmup 5
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNNERS = ("vanilla", "concepts offline", "concepts online")


# -- set-up -----------------------------------------------------------------------------------
def write_token_dataset(prefix: Path, vocab_size: int, documents: int, seed: int) -> str:
    """A Megatron .bin/.idx dataset of Markov-ish token documents ending in the EOD id
    (vocab - 1), as tests/training_fixtures.py writes."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(documents):
        length = int(rng.integers(64, 512))
        start = int(rng.integers(0, vocab_size - 1))
        tokens = (start + np.cumsum(rng.integers(1, 4, size=length))) % (vocab_size - 1)
        builder.add_document(np.append(tokens, vocab_size - 1).astype(np.int64),
                             [length + 1])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def write_wordlevel_tokenizer(directory: Path, vocab_size: int) -> str:
    """A Hugging Face tokenizer.json whose ids are the dataset's ids (EOD last)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def random_sae(d_in: int, d_sae: int, k: int, seed: int):
    import torch

    from megatron_latent.sae import TopKSAE

    g = torch.Generator().manual_seed(seed)
    return TopKSAE(W_enc=torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
                   b_enc=torch.randn(d_sae, generator=g) * 0.1,
                   W_dec=torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
                   b_dec=torch.randn(d_in, generator=g) * 0.1, k=k,
                   normalize_activations="layer_norm")


def label_tool():
    spec = importlib.util.spec_from_file_location("label_concepts",
                                                  ROOT / "tools" / "label_concepts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- runners ----------------------------------------------------------------------------------
def shape_flags(args) -> list[str]:
    if args.model:
        return ["--model", args.model]
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.num_attention_heads)]


def common_flags(args, data: str, tokenizer: str, iterations: int) -> list[str]:
    return [*shape_flags(args), "--seq-length", str(args.seq_length),
            "--data-path", data, "--split", "100,0,0",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
            "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size),
            "--train-iters", str(iterations), "--lr", "1e-3", "--min-lr", "1e-4",
            "--lr-warmup-fraction", "0.1", "--weight-decay", "0.01", "--num-workers", "0",
            "--log-interval", "1", "--eval-iters", "0", "--seed", str(args.seed),
            "--device", args.device, *(["--bf16"] if args.bf16 else [])]


def concept_flags(args) -> list[str]:
    flags = ["--method", "concepts", "--num-concepts", str(args.num_concepts),
             "--concept-top-k", str(args.concept_top_k)]
    if args.concept_insert_layer is not None:
        flags += ["--concept-insert-layer", str(args.concept_insert_layer)]
    return flags


def make_trainer(flags: list[str]):
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.trainer import Trainer

    run, _ = parse_run_config(flags)
    trainer = Trainer(run)
    trainer.setup()
    return trainer


def step_checksum(step) -> int:
    return sum(int(b["tokens"].long().sum()) * (i + 1) for i, b in enumerate(step.microbatches))


def time_steps(trainers: dict, steps: int, warmup: int, cuda: bool) -> dict[str, dict]:
    """Per runner: seconds and tokens of each step after `warmup`, the runners taking turns.
    Also checks that every runner read the same tokens each step."""
    import torch

    streams = {name: t.data.train_steps() for name, t in trainers.items()}
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    tokens: dict[str, list[int]] = {name: [] for name in trainers}
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    mismatched = 0
    for index in range(steps):
        sums = set()
        for name, trainer in trainers.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step = next(streams[name])
            result = trainer.engine.train_step(step.microbatches)
            trainer.scheduler.step(increment=trainer.run.training.global_batch_size)
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            sums.add(step_checksum(step))
            if index >= warmup:
                seconds[name].append(elapsed)
                tokens[name].append(step.flop_tokens)
                losses[name].append(result.lm_loss)
        mismatched += len(sums) > 1
        print(f"  step {index + 1}/{steps}: " + ", ".join(
            f"{name} {1e3 * seconds[name][-1]:.0f} ms" if index >= warmup else
            f"{name} (warm-up)" for name in trainers), flush=True)
    out = {}
    for name, trainer in trainers.items():
        median = statistics.median(seconds[name])
        step_tokens = statistics.median(tokens[name])
        flops = trainer.flops_per_token
        out[name] = {
            "timed_steps": len(seconds[name]), "ms_per_step": 1e3 * median,
            "ms_per_step_all": [1e3 * s for s in seconds[name]],
            "tokens_per_step": step_tokens, "tokens_per_s": step_tokens / median,
            "training_flops_per_token": flops,
            "s_per_pflop": median / (flops * step_tokens) * 1e15,
            "last_lm_loss": losses[name][-1]}
    if mismatched:
        print(f"warning: the runners read different tokens in {mismatched} of {steps} steps")
    out["_mismatched_steps"] = mismatched
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/concepts_throughput",
                        help="dataset, tokenizer, teacher, SAE and labels (remade every run)")
    parser.add_argument("--output", default=None,
                        help="JSON report (default: <work-dir>/throughput.json)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    shape = parser.add_argument_group("model shape (student and teacher alike)")
    shape.add_argument("--model", default=None, help="a preset (e.g. pythia-160m) instead of "
                       "the three shape flags")
    shape.add_argument("--num-layers", type=int, default=4)
    shape.add_argument("--hidden-size", type=int, default=128)
    shape.add_argument("--num-attention-heads", type=int, default=4)
    shape.add_argument("--seq-length", type=int, default=128,
                       help="training sequence and label window length")
    shape.add_argument("--vocab-size", type=int, default=4096,
                       help="the synthetic tokenizer's vocabulary")
    concepts = parser.add_argument_group("concepts")
    concepts.add_argument("--num-concepts", type=int, default=1024, help="C, the SAE's latents")
    concepts.add_argument("--sae-k", type=int, default=32, help="the random SAE's TopK k")
    concepts.add_argument("--concept-top-k", type=int, default=32)
    concepts.add_argument("--concept-insert-layer", type=int, default=None,
                          help="default: the method's, min(5, 3 x layers // 8)")
    concepts.add_argument("--teacher-layer", type=int, default=None,
                          help="teacher block the SAE reads (default: layers // 2)")
    concepts.add_argument("--teacher-iters", type=int, default=5,
                          help="vanilla training iterations of the teacher")
    run = parser.add_argument_group("timing")
    run.add_argument("--micro-batch-size", type=int, default=8)
    run.add_argument("--global-batch-size", type=int, default=8)
    run.add_argument("--iterations", type=int, default=30, help="timed steps per runner")
    run.add_argument("--warmup", type=int, default=5,
                     help="first steps of each runner left out of the timing")
    run.add_argument("--documents", type=int, default=160,
                     help="documents of the synthetic dataset (64-511 tokens each)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    import torch

    from megatron_latent.sae.files import write_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    work = (ROOT / args.work_dir).resolve()
    for name in ("tokens", "tokenizer", "teacher", "sae", "labels", "setup.log"):
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "setup.log"

    print("set-up: dataset, tokenizer, teacher, SAE, offline labels ...", flush=True)
    started = time.perf_counter()
    data = write_token_dataset(work / "tokens" / "train", args.vocab_size, args.documents,
                               args.seed)
    tokenizer = write_wordlevel_tokenizer(work / "tokenizer", args.vocab_size)
    teacher_dir = work / "teacher"
    with open(log, "w") as handle, contextlib.redirect_stdout(handle):
        teacher = make_trainer(common_flags(args, data, tokenizer, args.teacher_iters)
                               + ["--method", "vanilla", "--save", str(teacher_dir)])
        teacher.train()
    hidden = teacher.run.model.hidden_size
    layers = teacher.run.model.num_layers
    del teacher
    teacher_layer = layers // 2 if args.teacher_layer is None else args.teacher_layer
    sae = write_sae(random_sae(hidden, args.num_concepts, args.sae_k, args.seed),
                    str(work / "sae"))
    labels = work / "labels" / "train"
    with open(log, "a") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        code = label_tool().main([
            "--load", str(teacher_dir), "--layer", str(teacher_layer), "--sae", sae,
            "--data-path", data, "--seq-length", str(args.seq_length),
            "--output-prefix", str(labels), "--device", args.device, "--no-progress"])
    if code != 0:
        raise SystemExit(f"tools/label_concepts.py failed ({code}); see {log}")
    setup_seconds = time.perf_counter() - started
    print(f"  done in {setup_seconds:.0f}s", flush=True)

    steps = args.warmup + args.iterations
    base = common_flags(args, data, tokenizer, steps)
    flags = {
        "vanilla": base + ["--method", "vanilla"],
        "concepts offline": base + concept_flags(args) + ["--concept-labels", str(labels)],
        "concepts online": base + concept_flags(args) + [
            "--concept-sae", sae, "--concept-teacher-load", str(teacher_dir),
            "--concept-teacher-layer", str(teacher_layer)],
    }
    trainers = {}
    with open(log, "a") as handle, contextlib.redirect_stdout(handle):
        for name in RUNNERS:
            trainers[name] = make_trainer(flags[name])
    run0 = trainers["concepts offline"].run
    options = trainers["concepts offline"].options
    insert = options.resolved_insert_layer(run0.model.num_layers)
    print(f"timing {steps} steps per runner, taking turns ({args.warmup} warm-up) ...",
          flush=True)
    results = time_steps(trainers, steps, args.warmup, args.device == "cuda")
    mismatched = results.pop("_mismatched_steps")
    for trainer in trainers.values():
        trainer.close()

    model = run0.model
    shape = args.model or (f"{model.num_layers} layers, hidden {model.hidden_size}, "
                           f"{model.num_attention_heads} heads")
    print(f"\n{shape}, vocab {model.padded_vocab_size()}, seq {model.seq_length}, micro "
          f"{args.micro_batch_size} / global {args.global_batch_size}; C={args.num_concepts}, "
          f"top-k {args.concept_top_k}, insert layer {insert}, teacher layer {teacher_layer} "
          f"(teacher = student shape); {args.device}{' bf16' if args.bf16 else ''}, "
          f"{torch.get_num_threads()} CPU threads; median of {args.iterations} steps after "
          f"{args.warmup} warm-up")
    va = results["vanilla"]
    header = (f"{'runner':18} {'tokens/s':>10} {'ms/step':>9} {'FLOPs/token':>12} "
              f"{'time ratio':>11} {'FLOPs ratio':>12} {'time/FLOP ratio':>16}")
    print(header)
    print("-" * len(header))
    for name in RUNNERS:
        r = results[name]
        r["time_ratio"] = r["ms_per_step"] / va["ms_per_step"]
        r["flops_ratio"] = r["training_flops_per_token"] / va["training_flops_per_token"]
        r["time_per_flop_ratio"] = r["time_ratio"] / r["flops_ratio"]
        print(f"{name:18} {r['tokens_per_s']:>10,.0f} {r['ms_per_step']:>9.1f} "
              f"{r['training_flops_per_token']:>12.4g} {r['time_ratio']:>10.2f}x "
              f"{r['flops_ratio']:>11.2f}x {r['time_per_flop_ratio']:>15.2f}x")
    off, on = results["concepts offline"], results["concepts online"]
    offline_met = off["time_ratio"] <= off["flops_ratio"]
    online_over_offline = on["ms_per_step"] / off["ms_per_step"]
    print(f"offline mode's extra time <= its FLOPs share: time ratio {off['time_ratio']:.2f} vs "
          f"FLOPs ratio {off['flops_ratio']:.2f} (time/FLOP {off['time_per_flop_ratio']:.2f}; "
          f"{'met' if offline_met else 'NOT met'})")
    print(f"online mode is well above offline: online / offline time = "
          f"{online_over_offline:.2f} (FLOPs {on['flops_ratio'] / off['flops_ratio']:.2f})")
    if mismatched:
        print(f"warning: the runners' tokens differed in {mismatched} steps")

    output = Path(args.output) if args.output else work / "throughput.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "args": vars(args), "insert_layer": insert, "teacher_layer": teacher_layer,
        "setup_seconds": setup_seconds, "torch_threads": torch.get_num_threads(),
        "runners": results, "mismatched_steps": mismatched,
        "offline_time_ratio": off["time_ratio"], "offline_flops_ratio": off["flops_ratio"],
        "offline_goal_met": offline_met, "online_over_offline_time": online_over_offline,
        "online_over_offline_flops": on["flops_ratio"] / off["flops_ratio"],
        "flags": flags}, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    sys.exit(main())
