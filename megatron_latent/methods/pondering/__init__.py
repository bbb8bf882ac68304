"""Pondering: k extra passes per step, each feeding a probability-weighted embedding back in.

E_0 is the input embedding of the tokens. For s = 1..k the whole model runs on E_{s-1},
its output distribution P_s = softmax(logits_s) mixes the rows of the input embedding table,
T_s = P_s · W_in, and E_s = E_{s-1} + T_s. The final pass on E_k gives the logits the
next-token loss is taken on. Gradients flow through every pass and every softmax.

Under tensor parallelism the logits and W_in are sharded over the same vocabulary ranges, so
each rank mixes its own shard and only [tokens, h + 1] partial sums cross the TP group: no rank
ever holds a full-vocabulary tensor. See docs/pondering.md.

The package: options.py (flags, options, config change), mixing.py (vocab-parallel mixing),
model.py (the model), inference.py (KV caches per pass), flops.py; registered here.
"""

from __future__ import annotations

from ..registry import MethodSpec, register_method
from .flops import pondering_flops_breakdown, pondering_forward_flops_per_token
from .inference import PonderingInferenceContext
from .mixing import mix_input_embeddings
from .model import PonderingPythiaModel, build_pondering_model
from .options import (
    PIPELINE_REFUSAL,
    PonderingOptions,
    add_pondering_arguments,
    pondering_options_from_args,
    pondering_output_init_std,
    prepare_pondering_config,
)

PONDERING = register_method(
    MethodSpec(
        name="pondering",
        description="k extra passes per step feeding softmax(logits)·W_in back into the input "
                    "(PonderLM)",
        build_model=build_pondering_model,
        add_arguments=add_pondering_arguments,
        options_from_args=pondering_options_from_args,
        forward_flops_per_token=pondering_forward_flops_per_token,
        prepare_model_config=prepare_pondering_config,
        supports_pipeline_parallel=False,
        pipeline_refusal=PIPELINE_REFUSAL,
    )
)

__all__ = [
    "PIPELINE_REFUSAL",
    "PONDERING",
    "PonderingInferenceContext",
    "PonderingOptions",
    "PonderingPythiaModel",
    "add_pondering_arguments",
    "build_pondering_model",
    "mix_input_embeddings",
    "pondering_flops_breakdown",
    "pondering_forward_flops_per_token",
    "pondering_options_from_args",
    "pondering_output_init_std",
    "prepare_pondering_config",
]
