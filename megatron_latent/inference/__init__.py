"""Generation for every model of the project: KV-cached (one cache per pondering pass) or
full-prefix recomputation, greedy or seeded sampling, any TP size."""

from .generation import Generation, generate, generate_with_details
from .sampling import GenerationConfig, filter_logits, select_next_tokens
from .stepping import make_inference_context, sequence_parallel_disabled, unwrap_model

__all__ = [
    "Generation",
    "GenerationConfig",
    "filter_logits",
    "generate",
    "generate_with_details",
    "make_inference_context",
    "select_next_tokens",
    "sequence_parallel_disabled",
    "unwrap_model",
]
