#!/usr/bin/env python
"""Convert checkpoints between this project's Megatron layout (any TP/PP) and Hugging Face
GPTNeoX folders (config.json + model.safetensors).

  to-hf:   --load <checkpoint dir> [--iteration N] --output <hf dir>
  from-hf: --load <hf dir> --output <checkpoint dir> [--tensor-model-parallel-size N]

A converted Hugging Face folder loads with transformers' AutoModelForCausalLM and gives the
same logits; it also holds the run's tokenizer (tokenizer.json, tokenizer_config.json, ...),
which AutoTokenizer loads and which encodes text to the ids the run trained on, and
config.json / generation_config.json carry that tokenizer's EOS/BOS/PAD ids. The tokenizer is
the one recorded in the checkpoint unless --tokenizer-* is given. A checkpoint made from
Hugging Face weights holds no optimizer state: train from it with
`pretrain.py --load <dir> --finetune`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_latent.config import ConfigError  # noqa: E402

if TYPE_CHECKING:
    from megatron_latent.data.tokenizers import Tokenizer


def _run_tokenizer(args: argparse.Namespace, run_config: dict) -> Tokenizer | None:
    """The checkpoint's tokenizer (flags override what it records), or None if it has none."""
    from megatron_latent.data.tokenizers import TokenizerError, build_tokenizer

    given = {key: getattr(args, key) for key in
             ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
             if getattr(args, key)}
    settings = {} if args.tokenizer_type else {
        key: value for key, value in (run_config.get("tokenizer") or {}).items() if value}
    settings.update(given)
    if not settings.get("tokenizer_type"):
        return None
    try:
        return build_tokenizer(settings["tokenizer_type"],
                               tokenizer_model=settings.get("tokenizer_model"),
                               vocab_file=settings.get("vocab_file"),
                               merge_file=settings.get("merge_file"))
    except TokenizerError as error:
        if given:
            raise
        raise ConfigError(f"the tokenizer recorded in {args.load} cannot be loaded: {error}; "
                          "give it with --tokenizer-type and --tokenizer-model (or "
                          "--vocab-file/--merge-file)") from None


def _give_default_modes(directory: str) -> None:
    """Modes a plain ``mkdir``/``open`` would give under the umask: the staging directory is
    created private and some writers (safetensors) create private files."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)


def to_hf(args: argparse.Namespace) -> str:
    from safetensors.torch import save_file

    from megatron_latent.config import ModelConfig
    from megatron_latent.data.hf_tokenizer_export import export_hf_tokenizer
    from megatron_latent.models import hf_gpt_neox as mapping
    from megatron_latent.training.checkpointing import load_full_model_state

    if os.path.exists(args.output) and not args.overwrite:
        raise ConfigError(f"--output {args.output} exists (pass --overwrite)")
    full, run_config, iteration = load_full_model_state(args.load, args.iteration)
    method = run_config.get("method", "vanilla")
    if method != "vanilla" and not args.allow_method_mismatch:
        raise ConfigError(
            f"{args.load} was trained with --method {method}; a Hugging Face GPTNeoX computes a "
            "plain forward pass, so its outputs would differ from this model's. Pass "
            "--allow-method-mismatch to export the weights anyway."
        )
    model_config = ModelConfig(**run_config["model"])
    vocab = args.vocab_size or model_config.padded_vocab_size()
    tokenizer = _run_tokenizer(args, run_config)
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the exported "
                          f"embeddings only {vocab} rows (--vocab-size {vocab})")
    tensors = {k: v.contiguous() for k, v in mapping.canonical_to_hf(full, vocab).items()}
    parent = os.path.dirname(os.path.abspath(args.output)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        if tokenizer is None:  # --mock-data: megatron's NullTokenizer, end of document = V-1
            ids = {"bos_token_id": None, "eos_token_id": model_config.vocab_size - 1,
                   "pad_token_id": None}
        else:
            ids = export_hf_tokenizer(tokenizer, staging, model_max_length=model_config.seq_length)
        hf_config = mapping.model_config_to_hf_config(
            model_config, vocab_size=vocab, bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
        hf_config["megatron_latent"] = {"iteration": iteration, "method": method,
                                        "method_args": run_config.get("method_args", {})}
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(staging, "config.json"), hf_config)
        _write_json(os.path.join(staging, "generation_config.json"), {
            "bos_token_id": ids["bos_token_id"],
            "eos_token_id": ids["eos_token_id"],
            # Batched generation pads with the pad token, else with EOS.
            "pad_token_id": (ids["pad_token_id"] if ids["pad_token_id"] is not None
                             else ids["eos_token_id"]),
        })
        _give_default_modes(staging)
        if os.path.exists(args.output):
            if not args.overwrite:
                raise ConfigError(f"--output {args.output} exists (pass --overwrite)")
            shutil.rmtree(args.output)
        os.replace(staging, args.output)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return args.output


def _read_hf_weights(directory: str) -> dict:
    import torch

    safetensors_files = sorted(Path(directory).glob("*.safetensors"))
    if safetensors_files:
        from safetensors.torch import load_file

        weights = {}
        for path in safetensors_files:
            weights.update(load_file(str(path)))
        return weights
    bins = sorted(Path(directory).glob("pytorch_model*.bin"))
    if not bins:
        raise ConfigError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    weights = {}
    for path in bins:
        weights.update(torch.load(path, map_location="cpu", weights_only=True))
    return weights


def from_hf(args: argparse.Namespace) -> str:
    from megatron_latent.models import hf_gpt_neox as mapping
    from megatron_latent.training.checkpointing import write_weights_checkpoint
    from megatron_latent.training.config import RunConfig

    config_path = os.path.join(args.load, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"--load {args.load}: no config.json (not a Hugging Face folder)")
    with open(config_path) as handle:
        hf_config = json.load(handle)
    model_config = mapping.hf_config_to_model_config(hf_config)
    tp = args.tensor_model_parallel_size
    model_config.validate(tp)
    full = mapping.hf_to_canonical(_read_hf_weights(args.load), model_config.padded_vocab_size(tp))
    run_config = RunConfig(model=model_config).to_dict()
    run_config["parallel"]["tensor_model_parallel_size"] = tp
    return write_weights_checkpoint(args.output, full, run_config, tensor_parallel_size=tp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["to-hf", "from-hf"])
    parser.add_argument("--load", required=True, help="source directory")
    parser.add_argument("--output", required=True, help="destination directory")
    parser.add_argument("--iteration", type=int, default=None,
                        help="to-hf: iteration to export (default: latest)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="to-hf: rows of the exported embeddings (default: padded vocab)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="from-hf: TP size to split the weights for")
    parser.add_argument("--allow-method-mismatch", action="store_true",
                        help="to-hf: export a non-vanilla method's weights anyway")
    parser.add_argument("--overwrite", action="store_true", help="to-hf: replace --output")
    parser.add_argument("--tokenizer-type", default=None,
                        help="to-hf: tokenizer to export instead of the recorded one")
    parser.add_argument("--tokenizer-model", default=None,
                        help="to-hf: its .model / tokenizer.json (instead of the recorded one)")
    parser.add_argument("--vocab-file", default=None, help="to-hf: GPT2BPETokenizer vocab.json")
    parser.add_argument("--merge-file", default=None, help="to-hf: GPT2BPETokenizer merges.txt")
    args = parser.parse_args(argv)
    try:
        result = to_hf(args) if args.direction == "to-hf" else from_hf(args)
    except ConfigError as error:
        print(f"convert_checkpoint.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
