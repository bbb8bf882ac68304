"""Generation at TP=2 (sequence parallel off and on) equals TP=1, cached and uncached, greedy
and seeded sampling, for the plain and the pondering model; every TP rank gets the same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_latent.config import ModelConfig
from megatron_latent.distributed import tp_group, tp_rank, tp_size
from megatron_latent.inference import GenerationConfig, generate
from megatron_latent.methods.pondering import PonderingOptions, build_pondering_model
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.models.language_model import RuntimeOptions, build_pythia_model

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=250,
                     seq_length=32)
PROMPTS = [[5, 17, 3, 8], [200, 1, 2, 3, 4, 9], [42, 7]]
OPTIONS = {"vanilla": None, "pondering": PonderingOptions(steps=2),
           "pondering-top-k": PonderingOptions(steps=2, top_k=40)}
REQUESTS = [GenerationConfig(max_new_tokens=6, greedy=True),
            GenerationConfig(max_new_tokens=6, temperature=0.9, top_p=0.95, seed=5)]


def build(tp: int, sequence_parallel: bool, options):
    config = CONFIG.replace(make_vocab_size_divisible_by=128 * 2 // tp)
    runtime = RuntimeOptions(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    if options is None:
        return build_pythia_model(config, runtime)
    return build_pondering_model(config, runtime, options=options)


def full_weights(options) -> dict[str, torch.Tensor]:
    """TP=1 weights with peaked outputs, identical on both ranks."""
    generator = torch.Generator().manual_seed(21)
    model = build(1, False, options)
    weights = {}
    for name, tensor in mapping.model_to_canonical(model).items():
        scale = 1.0 if name == "output_layer.weight" else 0.1
        weights[name] = scale * torch.randn(tensor.shape, generator=generator) + (
            1.0 if name.endswith("norm.weight") else 0.0)
    return weights


def outputs(use_parallel, tp, sequence_parallel, options, weights):
    use_parallel(tp)
    model = build(tp, sequence_parallel, options)
    mapping.load_canonical(model, mapping.shard_for_rank(weights, tp_size(), tp_rank()))
    results = [generate(model, PROMPTS, request, use_cache=cache)
               for request in REQUESTS for cache in (True, False)]
    # Sequence parallelism is back on for training afterwards.
    assert model.config.sequence_parallel == sequence_parallel
    assert model.output_layer.sequence_parallel == sequence_parallel
    assert model.training
    return results


@pytest.mark.parametrize("name", list(OPTIONS))
def test_generation_tp2_equals_tp1(use_parallel, name):
    options = OPTIONS[name]
    weights = full_weights(options)
    reference = outputs(use_parallel, 1, False, options, weights)
    assert reference[0] == reference[1] and reference[2] == reference[3]
    for sequence_parallel in (False, True):
        results = outputs(use_parallel, 2, sequence_parallel, options, weights)
        assert results == reference, f"sequence_parallel={sequence_parallel}"
        seen = [None] * 2
        dist.all_gather_object(seen, results, group=tp_group())
        assert seen[0] == seen[1]
