"""Concepts (CoCoMix): a concept head predicts a teacher's SAE concepts from the residual
stream and its top-k, compressed to a continuous concept, is interleaved with the hidden
states through the upper blocks (docs/concepts.md; ../shared/methods/cocomix.md).

The package: options.py (flags), head.py (TP-sharded head, loss, top-k and compression),
model.py (the model and its KV caches), data.py (labelled GPT samples), online.py (teacher in
the step), flops.py; registered here.
"""

from __future__ import annotations

import torch

from ...config import ModelConfig
from ...models.hf_gpt_neox import register_tp_split
from ...models.language_model import RuntimeOptions, build_pythia_model
from ..registry import MethodSpec, register_method
from .data import build_concept_data, check_concept_data, concept_model_inputs
from .flops import concept_forward_flops
from .model import ConceptModel
from .options import (
    PIPELINE_REFUSAL,
    ConceptOptions,
    add_concept_arguments,
    concept_options_from_args,
)


def build_concept_model(model_config: ModelConfig, runtime: RuntimeOptions | None = None,
                        device: torch.device | str = "cpu",
                        options: ConceptOptions | None = None, pre_process: bool = True,
                        post_process: bool = True) -> ConceptModel:
    """A ConceptModel; with online options the teacher and SAE are loaded beside it (not
    parameters of it)."""
    if options is None or options.num_concepts < 1:
        raise ValueError("build_concept_model needs ConceptOptions with num_concepts")
    model = build_pythia_model(model_config, runtime, device, pre_process, post_process,
                               model_class=ConceptModel, options=options)
    if options.online:
        from .online import build_online_labeler

        model.online_labeler = build_online_labeler(
            options, torch.device(device), model_config.hidden_size,
            model.config.tensor_model_parallel_size)
    return model


def _forward_flops(config: ModelConfig, options: ConceptOptions | None, seq_length: int,
                   tp: int) -> float:
    options = options or ConceptOptions(num_concepts=1)
    teacher = None
    if options.online:
        from .online import teacher_model_config

        teacher = teacher_model_config(options)
    return concept_forward_flops(config, options, seq_length, tp, teacher)


# The head (column-parallel) and the compression rows are sharded over the C concepts.
register_tp_split(r"^concepts\.(linear\.(weight|bias)|compress\.weight)$", 0)

def _extra_parameters(config: ModelConfig, options: ConceptOptions | None) -> int:
    """The head (d×C weight, C bias), the compression (C×d rows, d bias) and p (d)."""
    if options is None:
        return 0
    h, c = config.hidden_size, options.num_concepts
    return 2 * h * c + c + 2 * h


CONCEPTS = register_method(
    MethodSpec(
        name="concepts",
        description="a concept head predicts a teacher's SAE concepts; their continuous "
                    "mixture is interleaved with the hidden states (CoCoMix)",
        build_model=build_concept_model,
        add_arguments=add_concept_arguments,
        options_from_args=concept_options_from_args,
        forward_flops_per_token=_forward_flops,
        build_data=build_concept_data,
        check_data=check_concept_data,
        model_inputs=concept_model_inputs,
        extra_parameters=_extra_parameters,
        supports_pipeline_parallel=False,
        pipeline_refusal=PIPELINE_REFUSAL,
    )
)

__all__ = ["CONCEPTS", "ConceptModel", "ConceptOptions", "build_concept_model"]
