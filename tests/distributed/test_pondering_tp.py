"""Pondering at TP=2 equals TP=1 (logits, loss, gathered gradients) for full-vocabulary and
top-N mixing, with sequence parallelism off and on; no rank materialises a full-vocab tensor."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_latent.config import ModelConfig
from megatron_latent.distributed import (
    allreduce_sequence_parallel_grads,
    gather_tensor_parallel,
    tp_group,
    tp_rank,
    tp_size,
)
from megatron_latent.methods.pondering import PonderingOptions, build_pondering_model
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.models.language_model import RuntimeOptions

# Padded to 512 at both TP sizes; no other dimension of the model is 512.
CONFIG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=500,
                     seq_length=16)
FULL_VOCAB = 512


def reference_weights() -> dict[str, torch.Tensor]:
    """Unsharded weights, identical on every rank, with peaked output distributions."""
    generator = torch.Generator().manual_seed(11)
    weights = {}
    for name, shape in mapping.canonical_shapes(CONFIG, FULL_VOCAB).items():
        std = 0.3 if name == "output_layer.weight" else 0.05
        tensor = std * torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            tensor += 1.0
        weights[name] = tensor
    return weights


class FullVocabWatch(TorchDispatchMode):
    """Records every op output that has a dimension as large as the full vocabulary."""

    def __init__(self):
        super().__init__()
        self.offenders: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and FULL_VOCAB in leaf.shape:
                self.offenders.append(f"{func}: {tuple(leaf.shape)}")
        return out


def run(use_parallel, tp, sequence_parallel, options, weights, ids, labels, watch=False):
    use_parallel(tp)
    config = CONFIG.replace(make_vocab_size_divisible_by=128 * 2 // tp)
    model = build_pondering_model(
        config, RuntimeOptions(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel),
        options=options,
    )
    mapping.load_canonical(model, mapping.shard_for_rank(weights, tp_size(), tp_rank()))
    with torch.no_grad():
        logits = gather_tensor_parallel(model(ids), dim=-1)
    monitor = FullVocabWatch() if watch else None
    if monitor is not None:
        with monitor:
            loss = model(ids, labels=labels)
            loss.mean().backward()
    else:
        loss = model(ids, labels=labels)
        loss.mean().backward()
    allreduce_sequence_parallel_grads(model)
    grads = [{name: p.grad for name, p in model.named_parameters()}]
    if tp > 1:
        gathered = [None] * tp
        dist.all_gather_object(gathered, grads[0], group=tp_group())
        grads = gathered
    return logits, loss.detach(), mapping.merge_shards(grads), monitor


CASES = [
    ("full-vocab", 0, False),
    ("full-vocab", 0, True),
    ("top-20", 20, False),
    ("top-20", 20, True),
    ("top-300", 300, False),  # more candidates than one rank's 256-row shard
]


@pytest.mark.parametrize("name, top_k, sequence_parallel", CASES,
                         ids=[f"{c[0]}-{'sp' if c[2] else 'no-sp'}" for c in CASES])
def test_pondering_tp2_equals_tp1(use_parallel, name, top_k, sequence_parallel):
    options = PonderingOptions(steps=2, top_k=top_k, scale_embeds=top_k == 20)
    weights = reference_weights()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_length + 1),
                           generator=torch.Generator().manual_seed(3))
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    logits1, loss1, grads1, _ = run(use_parallel, 1, False, options, weights, ids, labels)
    logits2, loss2, grads2, monitor = run(use_parallel, 2, sequence_parallel, options, weights,
                                          ids, labels, watch=top_k < 256)

    torch.testing.assert_close(logits2, logits1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss2, loss1, atol=1e-5, rtol=1e-5)
    assert set(grads1) == set(grads2)
    for key in grads1:
        torch.testing.assert_close(grads2[key], grads1[key], atol=1e-5, rtol=1e-4, msg=key)
    if monitor is not None:
        assert not monitor.offenders, monitor.offenders[:5]


@pytest.mark.parametrize("top_k", [0, 20])
@pytest.mark.parametrize("shift", [0.0, 200.0])
def test_mixing_of_large_logits_is_finite_and_equal_across_tp(use_parallel, top_k, shift):
    """Trained logits can sit far from 0 (e.g. +200): the softmax must subtract the global
    max (a sum of the ranks' maxima, or no shift at all, overflows or underflows to NaN).
    TP=1 and TP=2 both equal softmax(logits) @ W_in computed here in float64."""
    from megatron_latent.methods.pondering import mix_input_embeddings

    generator = torch.Generator().manual_seed(5)
    logits = 4.0 * torch.randn(6, 2, FULL_VOCAB, generator=generator) + shift
    table = torch.randn(FULL_VOCAB, 16, generator=generator)
    probabilities = torch.softmax(logits.double(), dim=-1)
    if top_k:
        kept = probabilities.topk(top_k, dim=-1)
        probabilities = torch.zeros_like(probabilities).scatter(-1, kept.indices, kept.values)
        probabilities = probabilities / probabilities.sum(-1, keepdim=True)
    expected = (probabilities @ table.double()).float()
    for tp in (1, 2):
        use_parallel(tp)
        rows = FULL_VOCAB // tp
        start = tp_rank() * rows
        mixed = mix_input_embeddings(logits[..., start:start + rows].contiguous(),
                                     table[start:start + rows], top_k=top_k, group=tp_group())
        assert torch.isfinite(mixed).all(), f"TP={tp}"
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-4, msg=f"TP={tp}")
