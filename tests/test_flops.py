"""FLOPs formulas of the plain and the pondering method against an independent count:
torch's FlopCounterMode on an actual forward (and backward) of the tiny model.

FlopCounterMode counts matmuls itself; it has no formula for the CPU attention kernel, for
embedding_bag or for the scatter-add of the top-k mixture's table gradient, so those are given
here from their definitions (2 FLOPs per multiply-add).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_latent.config import get_preset
from megatron_latent.methods.pondering import PonderingOptions
from megatron_latent.methods.registry import get_method

aten = torch.ops.aten
BATCH = 2


def attention_forward(query, key, value, *args, **kwargs) -> int:
    b, heads, sq, d = query
    return 2 * (2 * b * heads * sq * key[2] * d)  # Q K^T and P V


def attention_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    b, heads, sq, d = query
    return 4 * (2 * b * heads * sq * key[2] * d)  # dV, dP, dQ, dK


def bag_forward(weight, indices, *args, **kwargs) -> int:
    return 2 * indices[0] * weight[1]  # one multiply-add per gathered row element


def bag_weight_backward(grad, indices, *args, **kwargs) -> int:
    return 2 * indices[0] * grad[1]


def bag_sample_weight_backward(grad, weight, indices, *args, **kwargs) -> int:
    return 2 * indices[0] * weight[1]


def scatter_add(target, dim, index, source, *args, **kwargs) -> int:
    # The top-k mixture's table gradient: rows w * dU added onto the chosen rows; the
    # elementwise product and the add are one multiply-add per element.
    count = 1
    for size in source:
        count *= size
    return 2 * count


CUSTOM = {
    aten._scaled_dot_product_flash_attention_for_cpu: attention_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward,
    aten._embedding_bag: bag_forward,
    aten._embedding_bag_forward_only: bag_forward,
    aten._embedding_bag_backward: bag_weight_backward,
    aten._embedding_bag_per_sample_weights_backward: bag_sample_weight_backward,
    aten.index_add: scatter_add,
    aten.index_add_: scatter_add,
}


def measure(model, seq_length: int, backward: bool) -> float:
    ids = torch.randint(0, 4000, (BATCH, seq_length), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM)
    with counter:
        loss = model(ids, labels=ids)
        if backward:
            loss.mean().backward()
    return counter.get_total_flops() / (BATCH * seq_length)


CASES = {
    "vanilla": ("vanilla", None),
    "pondering-full-vocab": ("pondering", PonderingOptions(steps=3)),
    "pondering-top-k": ("pondering", PonderingOptions(steps=2, top_k=20)),
    "pondering-one-step-scaled": ("pondering", PonderingOptions(steps=1, scale_embeds=True)),
}


@pytest.mark.parametrize("method, options", CASES.values(), ids=CASES.keys())
def test_formula_matches_counted_flops(single_process_parallel, method, options):
    config = get_preset("tiny").model_config()
    spec = get_method(method)
    config = spec.prepare_model_config(config, options)
    model = spec.build_model(config, None, torch.device("cpu"), options)
    seq_length = config.seq_length
    formula = spec.forward_flops_per_token(config, options, seq_length, 1)

    forward = measure(model, seq_length, backward=False)
    assert forward == pytest.approx(formula, rel=1e-9)
    # Backward costs twice the forward: training = 3x forward.
    assert measure(model, seq_length, backward=True) == pytest.approx(3 * formula, rel=1e-9)


def test_pondering_formula_terms():
    config = get_preset("tiny").model_config()
    vanilla = get_method("vanilla").forward_flops_per_token(config, None, 128, 1)
    spec = get_method("pondering")
    h, vocab = config.hidden_size, config.padded_vocab_size()
    assert spec.forward_flops_per_token(config, PonderingOptions(steps=0), 128, 1) == vanilla
    full = spec.forward_flops_per_token(config, PonderingOptions(steps=3), 128, 1)
    assert full == 4 * vanilla + 3 * 2 * vocab * h
    top = spec.forward_flops_per_token(config, PonderingOptions(steps=3, top_k=100), 128, 1)
    assert top == 4 * vanilla + 3 * 2 * 100 * h
    # The vocabulary is padded per TP size, and so are head and mixing.
    wide = config.replace(vocab_size=4100)
    assert spec.forward_flops_per_token(wide, PonderingOptions(steps=1), 128, 2) == (
        2 * get_method("vanilla").forward_flops_per_token(wide, None, 128, 2)
        + 2 * wide.padded_vocab_size(2) * h)
