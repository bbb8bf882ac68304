#!/usr/bin/env python
r"""Train a TopK sparse autoencoder on a teacher's residual stream at one layer.

    python tools/train_sae.py --load ckpt/ --layer 5 --data-path data/train_text_document \
        --d-sae 32768 --k 32 --train-tokens 200000000 --output saes/layer5
    python tools/train_sae.py --hf-model pythia-160m/ --layer 5 --data-path ... --output ...

The teacher is a project checkpoint (--load; any method whose model is a PythiaModel, run
through its own embedding and decoder layers) or a Hugging Face GPTNeoX folder (--hf-model).
"Residual after block i" (0-based) is the hidden state block i hands to block i+1. Windows of
--seq-length tokens of --data-path (documents concatenated in file order) are shuffled with
--seed; the first --eval-tokens worth are held out, the rest train the SAE (cycled if
--train-tokens asks for more). --output receives the SAE folder (cfg.json +
sae_weights.safetensors, SAELens' layout; teacher, layer, held-out FVU and dead-latent share in
cfg.json's metadata). While training, --output/training_state.pt is written every
--save-interval steps; rerunning the same command resumes from it, and it is removed once the
SAE is written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STATE_FILE = "training_state.pt"
#: Flags that must be the same when a run resumes.
RESUME_KEYS = ("load", "hf_model", "layer", "data_path", "seq_length", "d_sae", "k",
               "normalize_activations", "lr", "batch_tokens", "eval_tokens", "seed",
               "auxk_coef", "dead_tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--load", default=None, help="teacher: a project checkpoint directory")
    teacher.add_argument("--hf-model", default=None,
                         help="teacher: a Hugging Face GPTNeoX folder")
    parser.add_argument("--layer", type=int, required=True,
                        help="0-based block whose residual output is read")
    parser.add_argument("--data-path", required=True,
                        help="indexed dataset prefix (without .bin/.idx)")
    parser.add_argument("--seq-length", type=int, default=1024, help="tokens per window")
    parser.add_argument("--d-sae", type=int, required=True, help="number of latents")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--normalize-activations", choices=["none", "layer_norm"],
                        default="layer_norm",
                        help="per-token standardisation before encoding (default layer_norm)")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate (default 2e-4 / sqrt(d_sae / 16384))")
    parser.add_argument("--batch-tokens", type=int, default=4096,
                        help="activations per step; a multiple of --seq-length")
    parser.add_argument("--train-tokens", type=int, required=True,
                        help="training activations in all (rounded down to whole steps)")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="held-out activations for the final FVU (default: the smaller of "
                             "65536 and a tenth of the dataset, whole windows)")
    parser.add_argument("--auxk-coef", type=float, default=1 / 32,
                        help="AuxK loss weight for dead latents (0: off)")
    parser.add_argument("--dead-tokens", type=int, default=10_000_000,
                        help="a latent that has not fired for this many tokens is dead")
    parser.add_argument("--output", required=True, help="SAE folder to write")
    parser.add_argument("--save-interval", type=int, default=1000,
                        help="steps between training-state saves (0: only at the end)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


class InputError(ValueError):
    pass


def _check(args: argparse.Namespace):
    """Everything that can be refused before a model is loaded; returns (shape, windows)."""
    from megatron_latent.data.indexed import DatasetPathError, read_index_header
    from megatron_latent.sae.activations import (
        TeacherError,
        TokenWindows,
        hf_teacher_shape,
        project_teacher_shape,
    )
    from megatron_latent.sae.files import CFG_FILE

    for flag in ("seq_length", "d_sae", "k", "batch_tokens", "train_tokens"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be positive, got "
                             f"{getattr(args, flag)}")
    if args.k > args.d_sae:
        raise InputError(f"--k {args.k} is larger than --d-sae {args.d_sae}")
    if args.batch_tokens % args.seq_length:
        raise InputError(f"--batch-tokens {args.batch_tokens} is not a multiple of "
                         f"--seq-length {args.seq_length}")
    if args.train_tokens < args.batch_tokens:
        raise InputError(f"--train-tokens {args.train_tokens} is less than one step "
                         f"(--batch-tokens {args.batch_tokens})")
    if args.lr is not None and not args.lr > 0:
        raise InputError(f"--lr must be positive, got {args.lr}")
    if args.save_interval < 0:
        raise InputError(f"--save-interval must be >= 0, got {args.save_interval}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"--output {args.output} exists and is not a directory")
    if (os.path.isfile(os.path.join(args.output, CFG_FILE))
            and not os.path.isfile(os.path.join(args.output, STATE_FILE))):
        raise InputError(f"--output {args.output} already holds a trained SAE; choose "
                         "another folder")
    try:
        read_index_header(args.data_path)
    except DatasetPathError as error:
        raise InputError(f"--data-path: {error}") from None
    try:
        if args.load:
            shape = project_teacher_shape(args.load)
        else:
            shape = hf_teacher_shape(args.hf_model)
    except TeacherError as error:
        raise InputError(str(error)) from None
    if not 0 <= args.layer < shape.num_layers:
        raise InputError(f"--layer {args.layer} is out of range: the teacher has "
                         f"{shape.num_layers} layers (0..{shape.num_layers - 1})")
    if args.seq_length > shape.max_sequence_length:
        raise InputError(f"--seq-length {args.seq_length} exceeds the teacher's context "
                         f"({shape.max_sequence_length})")
    windows = TokenWindows(args.data_path, args.seq_length)
    if args.eval_tokens is None:
        eval_windows = max(1, min(65536 // args.seq_length, len(windows) // 10))
    else:
        eval_windows = math.ceil(args.eval_tokens / args.seq_length)
        if eval_windows < 1:
            raise InputError("--eval-tokens must be positive")
    if len(windows) < eval_windows + 1:
        raise InputError(f"--data-path {args.data_path} has {len(windows)} windows of "
                         f"--seq-length {args.seq_length}; {eval_windows} are held out and "
                         "at least one must remain for training")
    args.eval_windows = eval_windows
    return shape, windows


def _resume_state(args: argparse.Namespace, path: str):
    import torch

    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in RESUME_KEYS:
        if state["args"].get(key) != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise InputError(f"{path} was written with {flag} {state['args'].get(key)!r}, not "
                             f"{getattr(args, key)!r}: rerun with the same flags or choose "
                             "another --output")
    return state


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        shape, windows = _check(args)
        state_path = os.path.join(args.output, STATE_FILE)
        state = _resume_state(args, state_path)
    except InputError as error:
        print(f"train_sae.py: error: {error}", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    from megatron_latent.config import ConfigError
    from megatron_latent.inference.loading import tool_device
    from megatron_latent.sae.activations import (
        TeacherError,
        load_hf_teacher,
        load_project_teacher,
        window_order,
    )
    from megatron_latent.sae.files import write_sae
    from megatron_latent.sae.training import (
        SAETrainConfig,
        SAETrainer,
        evaluate_sae,
        save_state,
        train_steps,
    )

    device = tool_device(args.device)
    try:
        if args.load:
            teacher = load_project_teacher(args.load, args.layer, device)
        else:
            teacher = load_hf_teacher(args.hf_model, args.layer, device)
    except (ConfigError, TeacherError, OSError) as error:
        print(f"train_sae.py: error: {error}", file=sys.stderr)
        return 2

    order = window_order(len(windows), args.seed)
    eval_ids, train_ids = order[:args.eval_windows], order[args.eval_windows:]
    per_step = args.batch_tokens // args.seq_length
    steps = args.train_tokens // args.batch_tokens

    def activations(ids) -> torch.Tensor:
        tokens = windows.batch(ids)
        if int(tokens.max()) >= shape.vocab_size:
            raise TeacherError(f"--data-path {args.data_path} holds token id "
                               f"{int(tokens.max())}, outside the teacher's vocabulary "
                               f"({shape.vocab_size})")
        return teacher(tokens).reshape(-1, shape.hidden_size)

    def batch(step: int) -> torch.Tensor:
        picks = [train_ids[(step * per_step + j) % len(train_ids)] for j in range(per_step)]
        return activations(picks)

    config = SAETrainConfig(d_in=shape.hidden_size, d_sae=args.d_sae, k=args.k,
                            normalize_activations=args.normalize_activations, lr=args.lr,
                            auxk_coef=args.auxk_coef, dead_tokens=args.dead_tokens)
    trainer = SAETrainer(config, device, generator=torch.Generator().manual_seed(args.seed))
    start = 0
    if state is not None:
        trainer.restore(state["trainer"])
        start = state["step"]
        print(f"train_sae.py: resuming {state_path} at step {start} of {steps}",
              file=sys.stderr)
    os.makedirs(args.output, exist_ok=True)
    saved_args = {key: getattr(args, key) for key in RESUME_KEYS}

    def save(step: int) -> None:
        save_state(state_path, {"args": saved_args, "step": step,
                                "trainer": trainer.checkpoint()})

    bar = tqdm(total=steps, initial=min(start, steps), unit="step", disable=args.no_progress,
               desc="train_sae")

    def on_step(step: int, losses: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(fvu=f"{losses['fvu']:.4f}", dead=f"{losses['dead_now']:.3f}")
        if args.save_interval and step % args.save_interval == 0 and step < steps:
            save(step)

    try:
        train_steps(trainer, batch, start, steps, on_step)
        bar.close()
        held_out = torch.cat([activations(eval_ids[i:i + per_step])
                              for i in range(0, len(eval_ids), per_step)])
    except TeacherError as error:
        bar.close()
        print(f"train_sae.py: error: {error}", file=sys.stderr)
        return 2
    save(max(start, steps))
    teacher_meta = ({"checkpoint": os.path.abspath(args.load)} if args.load
                    else {"hf_model": os.path.abspath(args.hf_model)})
    sae = trainer.to_sae()
    fvu = evaluate_sae(sae.to(device), held_out)
    sae.metadata = {
        "teacher": teacher_meta,
        "layer": args.layer,
        "hook": f"residual stream after block {args.layer} (0-based)",
        "data_path": os.path.abspath(args.data_path),
        "seq_length": args.seq_length,
        "training": {"tokens": int(trainer.tokens_seen), "steps": max(start, steps),
                     "batch_tokens": args.batch_tokens, "lr": config.learning_rate,
                     "seed": args.seed, "auxk_coef": args.auxk_coef,
                     "dead_tokens": args.dead_tokens},
        "eval": {"tokens": int(held_out.shape[0]), "fvu": fvu,
                 "dead_fraction": trainer.dead_fraction()},
    }
    write_sae(sae, args.output)
    os.remove(state_path)
    print(f"train_sae.py: wrote {args.output}: held-out FVU {fvu:.4f} on "
          f"{held_out.shape[0]} activations, dead latents {trainer.dead_fraction():.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
