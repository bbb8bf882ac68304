#!/usr/bin/env python
r"""Concept labels for a token dataset: a frozen teacher's SAE attribution top-K per token.

    python tools/label_concepts.py --load ckpt/ --layer 5 --sae saes/layer5 \
        --data-path data/train_text_document --seq-length 1024 --output-prefix labels/train

The teacher is a project checkpoint (--load, a PythiaModel) or a Hugging Face GPTNeoX folder
(--hf-model), run in fp32, eval mode, frozen. Windows are consecutive --seq-length slices of
the dataset's concatenated tokens (the last one shorter); per window one forward and backward
give score = (∂L/∂h · W_decᵀ) ⊙ z at the residual h after --layer, and the ids of the --k-attr
largest scores per token are its labels (see megatron_latent/sae/attribution.py). The output
is ``<prefix>_ids`` (int32), ``<prefix>_scores`` (float32) and ``<prefix>_weights`` (uint8:
0 on the last token of every window and below --min-score), indexed datasets with the input's
document and sequence layout (K values per token), and ``<prefix>.labels.json`` naming the
teacher, SAE, layer and the input's identity, written last. Work goes in chunks of
--chunk-windows windows kept under ``<prefix>.partial/``; rerunning the same command continues
from the finished chunks.

A project teacher too large for one device runs tensor-parallel: start the tool with
``torchrun --nproc_per_node N`` and ``--tensor-model-parallel-size N`` (the world is one TP
group; rank 0 writes). The labels equal the unsharded teacher's up to float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STATE_FILE = "state.json"
#: This process's rank under torchrun (a tensor-parallel teacher); rank 0 writes every file.
RANK = int(os.environ.get("RANK", "0"))
RESUME_KEYS = ("load", "hf_model", "layer", "sae", "data_path", "seq_length", "k_attr",
               "min_score", "chunk_windows")


class InputError(ValueError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--load", default=None, help="teacher: a project checkpoint directory")
    teacher.add_argument("--hf-model", default=None, help="teacher: a Hugging Face GPTNeoX folder")
    parser.add_argument("--layer", type=int, required=True,
                        help="0-based block whose residual output the SAE reads")
    parser.add_argument("--sae", required=True, help="SAE folder (cfg.json + weights)")
    parser.add_argument("--data-path", required=True, help="token dataset prefix (no .bin/.idx)")
    parser.add_argument("--seq-length", type=int, default=1024, help="tokens per teacher window")
    parser.add_argument("--output-prefix", required=True, help="prefix of the label datasets")
    parser.add_argument("--k-attr", type=int, default=4, help="labels per token (default 4)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="weight 0 for labels scoring below this (default: off)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--chunk-windows", type=int, default=256,
                        help="windows per saved chunk (the unit of resumption)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="shard a project teacher over this many ranks (torchrun with "
                             "exactly this many processes)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _teacher_tokenizer(args: argparse.Namespace):
    """The teacher's tokenizer fingerprint, or None when it records none."""
    from megatron_latent.data.provenance import tokenizer_fingerprint
    from megatron_latent.data.tokenizers import TokenizerError, build_tokenizer

    try:
        if args.load:
            from megatron_latent.training.checkpointing import read_checkpoint_config

            settings = {k: v for k, v in ((read_checkpoint_config(args.load) or {})
                                          .get("tokenizer") or {}).items() if v}
            if not settings.get("tokenizer_type"):
                return None
            tokenizer = build_tokenizer(settings.pop("tokenizer_type"), **settings)
        else:
            if not os.path.isfile(os.path.join(args.hf_model, "tokenizer.json")):
                return None
            tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=args.hf_model)
    except (TokenizerError, OSError, TypeError) as error:
        flag = "--load" if args.load else "--hf-model"
        raise InputError(f"{flag}: cannot build the teacher's tokenizer: {error}") from None
    return tokenizer_fingerprint(tokenizer)


def _check(args: argparse.Namespace):
    """Everything refused before the teacher is loaded; returns (shape, sae)."""
    from megatron_latent.data.indexed import DatasetPathError, read_index_header
    from megatron_latent.data.provenance import read_dataset_tokenizer
    from megatron_latent.sae.activations import (
        TeacherError,
        hf_teacher_shape,
        project_teacher_shape,
    )
    from megatron_latent.sae.files import SAEFormatError, read_sae
    from megatron_latent.sae.labels import meta_path

    tp = args.tensor_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world != tp:
        raise InputError(f"--tensor-model-parallel-size {tp} needs exactly {tp} processes "
                         f"(torchrun --nproc_per_node {tp}); this run has {world}")
    if tp > 1 and args.hf_model:
        raise InputError("--tensor-model-parallel-size > 1 shards a project teacher (--load); "
                         "a Hugging Face teacher runs on one device")
    for flag in ("seq_length", "k_attr", "batch_size", "chunk_windows"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be positive, got "
                             f"{getattr(args, flag)}")
    if args.seq_length < 2:
        raise InputError("--seq-length must be at least 2 (one next-token prediction)")
    if os.path.isfile(meta_path(args.output_prefix)):
        raise InputError(f"--output-prefix {args.output_prefix}: finished labels exist "
                         f"({meta_path(args.output_prefix)}); choose another prefix")
    try:
        header = read_index_header(args.data_path)
        data_tokenizer = read_dataset_tokenizer(args.data_path)
    except DatasetPathError as error:
        raise InputError(f"--data-path: {error}") from None
    try:
        shape = (project_teacher_shape(args.load) if args.load
                 else hf_teacher_shape(args.hf_model))
    except TeacherError as error:
        raise InputError(str(error)) from None
    if not 0 <= args.layer < shape.num_layers:
        raise InputError(f"--layer {args.layer} is out of range: the teacher has "
                         f"{shape.num_layers} layers (0..{shape.num_layers - 1})")
    if args.seq_length > shape.max_sequence_length:
        raise InputError(f"--seq-length {args.seq_length} exceeds the teacher's context "
                         f"({shape.max_sequence_length})")
    try:
        sae = read_sae(args.sae)
    except SAEFormatError as error:
        raise InputError(f"--sae: {error}") from None
    if sae.d_in != shape.hidden_size:
        raise InputError(f"--sae {args.sae} has d_in={sae.d_in}, but the teacher's hidden "
                         f"size is {shape.hidden_size}")
    if args.k_attr > sae.d_sae:
        raise InputError(f"--k-attr {args.k_attr} exceeds the SAE's {sae.d_sae} latents")
    teacher_tokenizer = _teacher_tokenizer(args)
    flag = "--load" if args.load else "--hf-model"
    if data_tokenizer is not None and teacher_tokenizer is not None:
        differences = data_tokenizer.differences(teacher_tokenizer)
        if differences:
            raise InputError(f"--data-path {args.data_path} was made with "
                             f"{data_tokenizer.describe()}, but the teacher ({flag}) uses "
                             f"{teacher_tokenizer.describe()}: {'; '.join(differences)}. "
                             "Teacher and student must share the tokenizer")
    else:
        print("label_concepts.py: warning: the tokenizer cannot be checked (the dataset or "
              "the teacher records none)", file=sys.stderr)
    if header.num_tokens < 1:
        raise InputError(f"--data-path {args.data_path} holds no tokens")
    return shape, sae


def _work_state(args: argparse.Namespace, work: str, identity: dict, write: bool = True
                ) -> None:
    """Create (when `write`: rank 0) or check the chunk folder's state (same flags and data as
    the first run)."""
    saved = {key: getattr(args, key) for key in RESUME_KEYS}
    saved["data"] = identity
    path = os.path.join(work, STATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            old = json.load(handle)
        for key, value in saved.items():
            if old.get(key) != value:
                flag = "--data-path" if key == "data" else "--" + key.replace("_", "-")
                raise InputError(f"{work} was started with {flag} {old.get(key)!r}, not "
                                 f"{value!r}: rerun with the same flags or remove {work}")
        return
    if not write:
        return
    from megatron_latent.fileio import atomic_write_text

    os.makedirs(work, exist_ok=True)
    atomic_write_text(path, json.dumps(saved, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.load = os.path.abspath(args.load) if args.load else None
    args.hf_model = os.path.abspath(args.hf_model) if args.hf_model else None
    args.sae = os.path.abspath(args.sae)
    args.data_path = os.path.abspath(args.data_path)
    try:
        shape, sae = _check(args)
        from megatron_latent.sae.labels import dataset_identity

        identity = dataset_identity(args.data_path)
        work = args.output_prefix + ".partial"
        _work_state(args, work, identity, write=RANK == 0)
    except InputError as error:
        print(f"label_concepts.py: error: {error}", file=sys.stderr)
        return 2

    import numpy as np
    import torch
    from tqdm import tqdm

    from megatron_latent.inference.loading import tool_device
    from megatron_latent.sae.activations import TokenWindows
    from megatron_latent.sae.attribution import (
        label_windows,
        split_hf_teacher,
        split_project_teacher,
    )
    from megatron_latent.sae.labels import (
        Chunk,
        load_chunk,
        save_chunk,
        window_bounds,
        write_label_datasets,
    )

    device = tool_device(args.device)
    if args.load:
        from megatron_latent.inference.loading import load_model_for_inference

        model = load_model_for_inference(args.load, None, args.tensor_model_parallel_size,
                                         device, dtype=torch.float32).model
        model.eval().requires_grad_(False)
        teacher = split_project_teacher(model, args.layer)
    else:
        import transformers

        model = transformers.GPTNeoXForCausalLM.from_pretrained(args.hf_model)
        model = model.float().to(device).eval().requires_grad_(False)
        teacher = split_hf_teacher(model, args.layer)
    sae = sae.to(device=device, dtype=torch.float32)

    tokens = TokenWindows(args.data_path, args.seq_length)
    bounds = window_bounds(tokens.num_tokens, args.seq_length)
    chunks = [bounds[i:i + args.chunk_windows] for i in range(0, len(bounds), args.chunk_windows)]
    paths = [os.path.join(work, f"chunk_{c:06d}.npz") for c in range(len(chunks))]

    def label(windows: list[tuple[int, int]]) -> tuple[np.ndarray, ...]:
        length = windows[0][1] - windows[0][0]
        ids = torch.from_numpy(np.stack([tokens.tokens(s, e) for s, e in windows]))
        if int(ids.max()) >= shape.vocab_size:
            raise InputError(f"--data-path {args.data_path} holds token id {int(ids.max())}, "
                             f"outside the teacher's vocabulary ({shape.vocab_size})")
        if length == 1:  # a one-token tail: no prediction, g = 0, every score 0
            k = args.k_attr
            return (np.tile(np.arange(k, dtype=np.int32), (1, 1)),
                    np.zeros((1, k), np.float32), np.zeros((1, k), np.uint8))
        out = label_windows(teacher, sae, ids.to(device), args.k_attr, args.min_score)
        return tuple(getattr(out, p).reshape(-1, args.k_attr).cpu().numpy()
                     for p in ("ids", "scores", "weights"))

    import torch.distributed as dist

    sharded = dist.is_initialized() and dist.get_world_size() > 1
    finished = [os.path.isfile(p) for p in paths]
    if sharded:  # every rank skips the same chunks (rank 0's view of the files)
        shared = [finished]
        dist.broadcast_object_list(shared, src=0)
        finished = shared[0]
    done = sum(finished)
    if done and RANK == 0:
        print(f"label_concepts.py: resuming: {done} of {len(paths)} chunks are done",
              file=sys.stderr)
    bar = tqdm(total=len(bounds), unit="window", disable=args.no_progress or RANK != 0,
               desc="label_concepts")
    try:
        for windows, path, skip in zip(chunks, paths, finished):
            if skip:
                bar.update(len(windows))
                continue
            parts: list[tuple[np.ndarray, ...]] = []
            full = [w for w in windows if w[1] - w[0] == args.seq_length]
            tail = [w for w in windows if w[1] - w[0] != args.seq_length]
            for i in range(0, len(full), args.batch_size):
                parts.append(label(full[i:i + args.batch_size]))
                bar.update(len(full[i:i + args.batch_size]))
            if tail:
                parts.append(label(tail))
                bar.update(1)
            if RANK == 0:
                save_chunk(path, Chunk(windows[0][0], *(np.concatenate([p[j] for p in parts])
                                                        for j in range(3))))
    except InputError as error:
        bar.close()
        print(f"label_concepts.py: error: {error}", file=sys.stderr)
        return 2
    bar.close()
    if sharded:
        dist.barrier()
        if RANK != 0:
            return 0
    teacher_meta = ({"checkpoint": args.load} if args.load else {"hf_model": args.hf_model})
    meta = {"teacher": teacher_meta, "layer": args.layer, "sae": args.sae,
            "sae_d_sae": sae.d_sae, "sae_k": sae.k, "k_attr": args.k_attr,
            "seq_length": args.seq_length, "min_score": args.min_score,
            "windows": "consecutive seq_length slices of the concatenated token stream (last "
                       "one shorter); labels for other windows are an approximation",
            "loss": "per-window mean shifted next-token CE"}
    write_label_datasets(args.output_prefix, args.data_path,
                         (load_chunk(p) for p in paths), meta)
    shutil.rmtree(work)
    print(f"label_concepts.py: wrote {args.output_prefix}_{{ids,scores,weights}} "
          f"({tokens.num_tokens} tokens, {len(bounds)} windows, K={args.k_attr})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
