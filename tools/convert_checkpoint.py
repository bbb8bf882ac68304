#!/usr/bin/env python
"""Convert checkpoints between this project's Megatron layout (any TP/PP) and Hugging Face
GPTNeoX folders (config.json + model.safetensors).

  to-hf:   --load <checkpoint dir> [--iteration N] --output <hf dir>
  from-hf: --load <hf dir> --output <checkpoint dir> [--tensor-model-parallel-size N]

A converted Hugging Face folder loads with transformers' GPTNeoXForCausalLM and gives the
same logits. A checkpoint made from Hugging Face weights holds no optimizer state: train
from it with `pretrain.py --load <dir> --finetune`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_latent.config import ConfigError  # noqa: E402


def to_hf(args: argparse.Namespace) -> str:
    from safetensors.torch import save_file

    from megatron_latent.config import ModelConfig
    from megatron_latent.models import hf_gpt_neox as mapping
    from megatron_latent.training.checkpointing import load_full_model_state

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
    hf_config = mapping.model_config_to_hf_config(model_config, vocab_size=vocab)
    hf_config["megatron_latent"] = {"iteration": iteration, "method": method,
                                    "method_args": run_config.get("method_args", {})}
    tensors = {k: v.contiguous() for k, v in mapping.canonical_to_hf(full, vocab).items()}
    parent = os.path.dirname(os.path.abspath(args.output)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, "config.json"), "w") as handle:
            json.dump(hf_config, handle, indent=2)
        tokenizer = run_config.get("tokenizer", {})
        model_file = tokenizer.get("tokenizer_model")
        if tokenizer.get("tokenizer_type") == "HuggingFaceTokenizer" and model_file:
            source = (os.path.join(model_file, "tokenizer.json") if os.path.isdir(model_file)
                      else model_file)
            if os.path.isfile(source):
                shutil.copy(source, os.path.join(staging, "tokenizer.json"))
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
