"""What generation needs from any model: KV-cache contexts, last-position logits over the
whole vocabulary, and a forward without sequence parallelism.

Models are told apart by what they offer, never by method name: a model with
`make_inference_context(max_batch_size, max_sequence_length)` (pondering: one cache per pass)
builds its own context; any other model gets megatron-core's StaticInferenceContext.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor

from ..distributed import gather_tensor_parallel


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The language model inside DDP / Float16Module-style wrappers (`.module` chains)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def make_inference_context(model: torch.nn.Module, max_batch_size: int,
                           max_sequence_length: int):
    """KV caches for one batch: the model's own kind if it defines one, else a static one."""
    factory = getattr(unwrap_model(model), "make_inference_context", None)
    if factory is not None:
        return factory(max_batch_size, max_sequence_length)
    return StaticInferenceContext(max_batch_size, max_sequence_length)


def true_vocab_size(model: torch.nn.Module) -> int:
    """The tokenizer's vocabulary (logits beyond it are padding and never sampled)."""
    inner = unwrap_model(model)
    config = getattr(inner, "model_config", None)
    if config is not None:
        return config.vocab_size
    return inner.vocab_size


def max_positions(model: torch.nn.Module) -> int | None:
    return getattr(unwrap_model(model), "max_sequence_length", None)


def last_token_logits(model: torch.nn.Module, input_ids: Tensor, inference_context=None) -> Tensor:
    """Logits of the last position over the real vocabulary, [batch, vocab], identical on
    every TP rank (the vocab shards of that one position are all-gathered: b x V values)."""
    logits = model(input_ids, inference_context=inference_context)[:, -1]
    logits = gather_tensor_parallel(logits.contiguous(), dim=-1)
    return logits[:, :true_vocab_size(model)].float()


def broadcast_from_tensor_parallel_source(tensor: Tensor) -> Tensor:
    """Make every TP rank hold TP rank 0's copy (so sampled tokens agree bit for bit)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return tensor


@contextmanager
def sequence_parallel_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run a sequence-parallel model without sequence parallelism (same weights, same results).

    Decoding feeds one position at a time, which cannot be split over the TP ranks. The flags
    megatron-core's layers read at forward time are switched off and restored afterwards.
    """
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if config is None or not getattr(config, "sequence_parallel", False):
        yield
        return
    saved: list[tuple[object, str, bool]] = []
    configs = {id(config): config}
    for module in inner.modules():
        for name in ("sequence_parallel", "reduce_scatter_embeddings"):
            value = getattr(module, name, None)
            if isinstance(value, bool) and value:
                saved.append((module, name, value))
                setattr(module, name, False)
        module_config = getattr(module, "config", None)
        if module_config is not None and getattr(module_config, "sequence_parallel", False):
            configs[id(module_config)] = module_config
    for item in configs.values():
        saved.append((item, "sequence_parallel", True))
        item.sequence_parallel = False
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
