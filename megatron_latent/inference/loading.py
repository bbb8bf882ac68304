"""Rebuild a trained model from a checkpoint for generation or evaluation, at any TP size."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import ParallelConfig, initialize_parallel, tp_rank, tp_size
from ..methods.registry import get_method
from ..models.hf_gpt_neox import load_canonical, shard_for_rank
from ..models.language_model import RuntimeOptions
from ..training.checkpointing import load_full_model_state
from ..training.config import RunConfig


def tool_device(choice: str) -> torch.device:
    """A tool's --device {auto,cpu,cuda}: cuda:LOCAL_RANK (torchrun's local rank, 0 alone) for
    cuda, or for auto where CUDA is visible; else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """The default dtype for generation and evaluation: bfloat16 on CUDA, float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class LoadedModel:
    model: torch.nn.Module
    run: RunConfig
    iteration: int
    tokenizer: Any | None


def load_model_for_inference(
    checkpoint: str,
    iteration: int | None = None,
    tensor_parallel_size: int = 1,
    device: torch.device | None = None,
    tokenizer_overrides: dict[str, str | None] | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """The checkpoint's method model in eval mode on this rank (weights re-cut for
    `tensor_parallel_size`), with the tokenizer it was trained with (or the overrides).

    The model is built in `dtype` (default: `inference_dtype(device)`) directly on the device
    and without drawing random weights: every parameter is then loaded from the checkpoint."""
    full, stored, found_iteration = load_full_model_state(checkpoint, iteration)
    run = RunConfig.from_dict(stored)
    device = initialize_parallel(
        ParallelConfig(tensor_model_parallel_size=tensor_parallel_size), device,
        seed=run.training.seed)
    spec = get_method(run.method)
    options = spec.options_from_args(argparse.Namespace(**run.method_args))
    model_config = spec.prepare_model_config(run.model, options)
    dtype = dtype or inference_dtype(device)
    runtime = RuntimeOptions(
        tensor_model_parallel_size=tp_size(), params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=device.type == "cpu", perform_initialization=False)
    model = spec.build_model(model_config, runtime, device, options, True, True)
    load_canonical(model, shard_for_rank(full, tp_size(), tp_rank(),
                                         getattr(model, "vocab_size", None)))
    model = model.to(dtype).eval()

    settings = run.tokenizer
    overrides = {k: v for k, v in (tokenizer_overrides or {}).items() if v}
    tokenizer_type = overrides.get("tokenizer_type", settings.tokenizer_type)
    tokenizer = None
    if tokenizer_type:
        from ..data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(
            tokenizer_type,
            tokenizer_model=overrides.get("tokenizer_model", settings.tokenizer_model),
            vocab_file=overrides.get("vocab_file", settings.vocab_file),
            merge_file=overrides.get("merge_file", settings.merge_file),
        )
    return LoadedModel(model, run, found_iteration, tokenizer)
