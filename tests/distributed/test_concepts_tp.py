"""The concept model at TP=2 equals TP=1 on the same full-size weights and batch: LM loss,
concept loss and every parameter's gradient (the head and the compression rows sharded over
concepts, the global top-k across ranks), with and without sequence parallelism (the
interleaved 2T sequence split over ranks), and cached decoding's logits. Planted bugs (each
rank keeping its local top-k; one rank's compression rows on both) must fail.

Results are gathered over the world before anything is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_thought_memory_model_tp import (  # noqa: E402
    all_ranks,
    gathered_grads,
    load_full_weights,
    mismatches,
)

from megatron_latent.config import ModelConfig  # noqa: E402
from megatron_latent.distributed import (  # noqa: E402
    allreduce_sequence_parallel_grads,
    gather_tensor_parallel,
)
from megatron_latent.methods.concepts import ConceptOptions, build_concept_model  # noqa: E402
from megatron_latent.methods.concepts.model import SCALED_LOSS_KEY  # noqa: E402
from megatron_latent.models import sharded_topk  # noqa: E402
from megatron_latent.models.language_model import RuntimeOptions  # noqa: E402

VOCAB, C, TOPK, K = 64, 40, 6, 3
MODEL = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                    seq_length=8)


def make_batch(seed: int = 1, b: int = 3, s: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    concept_ids = torch.randint(0, C, (b, s, K), generator=g)
    weights = torch.ones(b, s, K)
    weights[:, -1] = 0
    return ids, labels, concept_ids, weights


def build(use_parallel, tp: int, sequence_parallel: bool = False, mixing: str = "interleave",
          frozen_shard: str | None = None):
    use_parallel(tp)
    options = ConceptOptions(num_concepts=C, top_k=TOPK, k_attr=K, insert_layer=2,
                             loss_weight=0.5, mixing=mixing)
    model = build_concept_model(
        MODEL.replace(make_vocab_size_divisible_by=VOCAB // tp),
        RuntimeOptions(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel),
        "cpu", options)
    load_full_weights(model, frozen_shard)
    with torch.no_grad():
        model.concepts.linear.bias.sub_(0.8)  # chosen logits of both signs
    return model


def run(use_parallel, tp: int, **kwargs):
    """(lm loss, scaled concept loss, {name: full gradient}, {name: [grad per TP rank]} of
    replicated parameters)."""
    model = build(use_parallel, tp, **kwargs)
    ids, labels, concept_ids, weights = make_batch()
    lm, aux = model(ids, labels=labels, concept_ids=concept_ids, concept_weights=weights)
    concept = aux[SCALED_LOSS_KEY]
    (lm.mean() + concept).backward()
    allreduce_sequence_parallel_grads(model)
    grads, replicated = gathered_grads(model, tp)
    return lm.detach().mean(), concept.detach(), grads, replicated


def compare(one, two) -> list[str]:
    problems = mismatches(two[0], one[0], "lm loss") + mismatches(two[1], one[1], "concept loss")
    for name in sorted(one[2]):
        problems += mismatches(two[2][name], one[2][name], f"grad {name}")
    for name, copies in two[3].items():
        for rank, copy in enumerate(copies[1:], start=1):
            problems += mismatches(copy, copies[0], f"replicated grad {name} rank {rank} vs 0")
    return problems


@pytest.mark.parametrize("sequence_parallel,mixing", [(False, "interleave"), (True, "interleave"),
                                                      (False, "add"), (True, "add")])
def test_concepts_tp2_equals_tp1(use_parallel, sequence_parallel, mixing):
    one = run(use_parallel, 1, mixing=mixing)
    two = run(use_parallel, 2, sequence_parallel=sequence_parallel, mixing=mixing)
    summary = {"problems": compare(one, two),
               "zero": [n for n, g in one[2].items() if not g.abs().sum() > 0],
               "sharded": sorted(set(one[2]) - set(two[3]))}
    for rank, result in enumerate(all_ranks(summary)):
        assert not result["problems"], (rank, result["problems"])
        assert not result["zero"], (rank, result["zero"])
        assert {"concepts.linear.weight", "concepts.linear.bias",
                "concepts.compress.weight"} <= set(result["sharded"]), result["sharded"]


@pytest.mark.parametrize("plant", ["local-top-k", "rank-0-rows"])
def test_planted_tp_bugs_fail(use_parallel, plant, monkeypatch):
    one = run(use_parallel, 1)
    if plant == "local-top-k":  # each rank keeps its own top-k: 2k concepts mixed in
        monkeypatch.setattr("megatron_latent.methods.concepts.head.global_top_k",
                            lambda values, k, group: sharded_topk.global_top_k(values, k, None))
        two = run(use_parallel, 2)
    else:
        two = run(use_parallel, 2, frozen_shard="concepts.compress.weight")
    for rank, problems in enumerate(all_ranks(compare(one, two))):
        assert any(p.startswith("lm loss") for p in problems), (rank, problems)


def test_cached_decoding_tp2_equals_tp1(use_parallel):
    """Last-position logits of a prompt prefill and three cached steps, over the whole
    vocabulary, equal at TP=1 and TP=2."""
    ids = make_batch(b=2, s=6)[0]
    outputs = []
    for tp in (1, 2):
        model = build(use_parallel, tp).eval()
        with torch.no_grad():
            context = model.make_inference_context(2, 6)
            steps = [model(ids[:, :3], inference_context=context)[:, -1]]
            context.increment_sequence_len_offset(3)
            for t in range(3, 6):
                steps.append(model(ids[:, t:t + 1], inference_context=context)[:, -1])
                context.increment_sequence_len_offset(1)
            logits = torch.stack(steps, 1)
            if tp > 1:
                logits = gather_tensor_parallel(logits.contiguous(), dim=-1)
        outputs.append(logits[..., :VOCAB])
    problems = mismatches(outputs[1], outputs[0], "cached logits")
    for rank, found in enumerate(all_ranks(problems)):
        assert not found, (rank, found)
