"""TP=2 equals TP=1 for the Pythia model (logits, loss, gathered gradients), with sequence
parallelism off and on, and TP=2 equals Hugging Face GPTNeoX on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_latent.config import ModelConfig
from megatron_latent.distributed import (
    allreduce_sequence_parallel_grads,
    gather_tensor_parallel,
    tp_group,
    tp_rank,
    tp_size,
)
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.models.language_model import RuntimeOptions, build_pythia_model

CONFIG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=500,
                     seq_length=32)


def reference_weights() -> dict[str, torch.Tensor]:
    """Unsharded weights with non-trivial norms/biases, identical on every rank."""
    generator = torch.Generator().manual_seed(7)
    weights = {}
    for name, shape in mapping.canonical_shapes(CONFIG, CONFIG.padded_vocab_size(2)).items():
        tensor = 0.05 * torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            tensor += 1.0
        weights[name] = tensor
    return weights


def run(use_parallel, tp: int, sequence_parallel: bool, weights, ids, labels):
    """Logits (gathered over vocab), per-token loss and gathered gradients at a TP size."""
    use_parallel(tp)
    # The same vocab padding at both sizes, so logits line up column for column.
    config = CONFIG.replace(make_vocab_size_divisible_by=128 * 2 // tp)
    model = build_pythia_model(
        config, RuntimeOptions(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    )
    mapping.load_canonical(model, mapping.shard_for_rank(weights, tp_size(), tp_rank()))
    logits = gather_tensor_parallel(model(ids).detach(), dim=-1)
    loss = model(ids, labels=labels)
    loss.mean().backward()
    allreduce_sequence_parallel_grads(model)
    grads = [{name: p.grad for name, p in model.named_parameters()}]
    if tp > 1:
        gathered = [None] * tp
        dist.all_gather_object(gathered, grads[0], group=tp_group())
        grads = gathered
    return logits, loss.detach(), mapping.merge_shards(grads)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["no-sp", "sp"])
def test_tp2_equals_tp1(use_parallel, sequence_parallel):
    weights = reference_weights()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_length + 1), generator=generator)
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    logits1, loss1, grads1 = run(use_parallel, 1, False, weights, ids, labels)
    logits2, loss2, grads2 = run(use_parallel, 2, sequence_parallel, weights, ids, labels)

    torch.testing.assert_close(logits2, logits1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss2, loss1, atol=1e-5, rtol=1e-5)
    assert set(grads1) == set(grads2)
    for name in grads1:
        torch.testing.assert_close(grads2[name], grads1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_tp2_matches_hugging_face(use_parallel):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, rotary_pct=0.25, max_position_embeddings=64,
        use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
    )
    torch.manual_seed(0)
    hf_model = transformers.GPTNeoXForCausalLM(hf_config).float().eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = hf_model(ids).logits

    use_parallel(2)
    config = mapping.hf_config_to_model_config(hf_config.to_dict())
    model = build_pythia_model(config, RuntimeOptions(tensor_model_parallel_size=2)).eval()
    assert config.padded_vocab_size(2) == 256
    full = mapping.hf_to_canonical(hf_model.state_dict(), config.padded_vocab_size(2))
    mapping.load_canonical(model, mapping.shard_for_rank(full, 2, tp_rank()))
    with torch.no_grad():
        local = model(ids)
    assert local.shape[-1] == 128  # each rank holds half the vocabulary
    logits = gather_tensor_parallel(local, dim=-1)
    assert (logits - reference).abs().max().item() <= 1e-4
