"""Thought memory (Thought Gestalt): language as a sequence of sentences, each read against a
FIFO memory of the earlier sentences' vectors (docs/thought_memory.md).

The package: streams.py (sentence-stream batches), layers.py (memory cross-attention, gated C
layer, sentence-vector head, memory), model.py (the model), options.py (flags, vocabulary and
row layout), data.py (the trainer's batches), flops.py; registered here.
"""

from __future__ import annotations

import dataclasses

import torch

from ...config import ModelConfig
from ...models.language_model import RuntimeOptions, build_pythia_model
from ..registry import MethodSpec, register_method
from .data import (
    build_thought_memory_data,
    check_thought_memory_data,
    thought_memory_model_inputs,
)
from .flops import thought_memory_flops
from .model import ThoughtMemoryModel, ThoughtMemoryOptions
from .options import (
    PIPELINE_REFUSAL,
    ThoughtMemoryRunOptions,
    add_thought_memory_arguments,
    layout_for_model,
    prepare_thought_memory_config,
    thought_memory_options_from_args,
)


def build_thought_memory_model(
    model_config: ModelConfig,
    runtime: RuntimeOptions | None = None,
    device: torch.device | str = "cpu",
    options: ThoughtMemoryRunOptions | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> ThoughtMemoryModel:
    """A ThoughtMemoryModel for a config prepared by prepare_thought_memory_config; the row
    layout (special ids, L) is kept on the model as `layout`."""
    options = options or ThoughtMemoryRunOptions(ThoughtMemoryOptions(eos_id=-1))
    layout = layout_for_model(model_config, options)
    model_options = dataclasses.replace(options.model, eos_id=layout.eos)
    model = build_pythia_model(model_config, runtime, device, pre_process, post_process,
                               model_class=ThoughtMemoryModel, options=model_options)
    model.layout = layout
    return model


def _generate_text(*args, **kwargs):
    from .generation import generate_text

    return generate_text(*args, **kwargs)


def _score_continuations(*args, **kwargs):
    from .scoring import score_continuations

    return score_continuations(*args, **kwargs)


def _forward_flops_per_slot(config: ModelConfig, options: ThoughtMemoryRunOptions | None,
                            seq_length: int, tp: int) -> float:
    options = options or ThoughtMemoryRunOptions(ThoughtMemoryOptions(eos_id=-1))
    return thought_memory_flops(config, options.model, options.L, tp=tp)


THOUGHT_MEMORY = register_method(
    MethodSpec(
        name="thought-memory",
        description="sentence rows read a FIFO memory of earlier sentence vectors through "
                    "gated cross-attention (Thought Gestalt)",
        build_model=build_thought_memory_model,
        add_arguments=add_thought_memory_arguments,
        options_from_args=thought_memory_options_from_args,
        forward_flops_per_token=_forward_flops_per_slot,
        prepare_model_config=prepare_thought_memory_config,
        build_data=build_thought_memory_data,
        check_data=check_thought_memory_data,
        model_inputs=thought_memory_model_inputs,
        generate_text=_generate_text,
        score_continuations=_score_continuations,
        batches_are_gpt_samples=False,
        supports_pipeline_parallel=False,
        pipeline_refusal=PIPELINE_REFUSAL,
    )
)

__all__ = [
    "THOUGHT_MEMORY",
    "ThoughtMemoryModel",
    "ThoughtMemoryOptions",
    "ThoughtMemoryRunOptions",
    "build_thought_memory_model",
    "layout_for_model",
]
