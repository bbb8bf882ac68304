"""thought_memory_flops against an independent count: torch's FlopCounterMode on an actual forward
(and forward + backward) of a tiny ThoughtMemoryModel on a stream batch, per sentence row token
slot (B × T × L slots, pads included).

FlopCounterMode counts matmuls itself; it has no formula for the CPU attention kernel, so that
one is given here from its definition (2 FLOPs per multiply-add), as tests/test_flops.py does.
The batch writes a sentence vector from every row, so with memory_size 2 the memory is full
from t = 2 on; the executed work does not depend on that (the memory is always read as M slots,
empty ones masked), and the forward count is exact for every row.

The backward is not exactly 2 × forward, for a structural reason no batch can avoid: the
slot-code term W·pe (a plain F.linear) has a constant input, so only its weight gradient runs.
(The first row's memory is a fresh zero tensor without gradient, but megatron-core's linear
computes the K|V projection's input gradient anyway, so that row costs the full 2 ×.) The test
checks forward + backward = 3 × forward − backward_deficit_per_slot exactly.
"""

from __future__ import annotations

import numpy
import pytest
import torch
from test_flops import attention_backward, attention_forward  # the CPU SDPA kernel's FLOPs
from torch.utils.flop_counter import FlopCounterMode

from megatron_latent.config import ModelConfig
from megatron_latent.flops import forward_flops_per_token
from megatron_latent.methods.thought_memory import flops as tm_flops
from megatron_latent.methods.thought_memory.flops import (
    backward_deficit_per_slot,
    thought_memory_flops,
    thought_memory_flops_breakdown,
)
from megatron_latent.methods.thought_memory.model import ThoughtMemoryModel, ThoughtMemoryOptions
from megatron_latent.methods.thought_memory.streams import StreamLayout, row_arrays
from megatron_latent.models.language_model import RuntimeOptions, build_pythia_model

aten = torch.ops.aten
H, HEADS = 32, 2
LAYOUT = StreamLayout.for_vocab(60, max_content=5, max_sentences=4)  # L = 8
L = LAYOUT.L
B, T = 2, 4


CUSTOM = {
    aten._scaled_dot_product_flash_attention_for_cpu: attention_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward,
}


def make_batch(seed: int = 0):
    """Every row valid and closed by an EOS (so every row writes a memory vector)."""
    rng = numpy.random.RandomState(seed)
    ids = torch.full((B, T, L), LAYOUT.pad, dtype=torch.long)
    targets, weights = ids.clone(), torch.zeros(B, T, L)
    for b in range(B):
        for t in range(T):
            content = rng.randint(0, 60, size=rng.randint(1, LAYOUT.max_content + 1))
            row = row_arrays(content, LAYOUT, eod=False, w_eos=0.05)
            ids[b, t], targets[b, t], weights[b, t] = (torch.from_numpy(a) for a in row)
    return ids, targets, weights, torch.ones(B, T, dtype=torch.bool)


def make_model(config: ModelConfig, options: ThoughtMemoryOptions):
    return build_pythia_model(config, RuntimeOptions(), model_class=ThoughtMemoryModel,
                              options=options)


def measure(model, batch, backward: bool) -> tuple[float, dict]:
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM)
    with counter:
        loss, aux = model(*batch)
        if backward:
            (loss.sum() + aux["s_rep_hinge_loss"]).backward()
    assert int(aux["memory_writes"]) == B * T  # memory full from t = memory_size on
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / (B * T * L), counts


CASES = {
    "default-SCSC-M2": (4, None, 2),
    "SCCS-M3": (4, "SCCS", 3),
    "SSCC-ffn48-M1": (4, "SSCC", 1),
}


@pytest.mark.parametrize("layers, pattern, memory_size", CASES.values(), ids=CASES.keys())
def test_formula_matches_counted_flops(single_process_parallel, layers, pattern, memory_size):
    ffn = 48 if pattern == "SSCC" else None
    config = ModelConfig(num_layers=layers, hidden_size=H, num_attention_heads=HEADS,
                         vocab_size=64, seq_length=L, ffn_hidden_size=ffn)
    options = ThoughtMemoryOptions(eos_id=LAYOUT.eos, memory_size=memory_size,
                                   layer_pattern=pattern)
    model = make_model(config, options)
    batch = make_batch()
    formula = thought_memory_flops(config, options, L, memory_size, 1)

    forward, counts = measure(model, batch, backward=False)
    # Attention ran through the CPU flash kernel, which only the custom mapping counts.
    assert any("flash_attention_for_cpu" in op for op in counts), counts
    assert forward == pytest.approx(formula, rel=1e-12)

    model.zero_grad(set_to_none=True)
    total, _ = measure(model, batch, backward=True)
    deficit = backward_deficit_per_slot(config, options, L, memory_size)
    assert 0 < deficit < 0.1 * formula
    assert total == pytest.approx(3 * formula - deficit, rel=1e-12)


def test_formula_terms():
    config = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=100,
                         seq_length=16)
    options = ThoughtMemoryOptions(eos_id=0, memory_size=40, layer_pattern="SSSS")
    h, length = 64, 16
    # All-S: the plain stack on a row of L, plus one S_REP linear per row.
    plain = forward_flops_per_token(config, length).forward
    assert thought_memory_flops(config, options, length) == pytest.approx(
        plain + 2 * h * h / length)
    # One S layer swapped for a C layer: loses K, V (2h²) and L×L attention, gains the
    # memory K|V and slot-code projections per row and L×M attention.
    one_c = ThoughtMemoryOptions(eos_id=0, memory_size=40, layer_pattern="SSSC")
    m = 40
    delta = (-2 * 2 * h * h - 4 * length * h
             + (2 * m * h * 2 * h + 2 * m * h * 2 * h) / length + 4 * m * h)
    assert thought_memory_flops(config, one_c, length) == pytest.approx(
        thought_memory_flops(config, options, length) + delta)
    # memory_size overrides options; TP pads the head's vocabulary only.
    assert thought_memory_flops(config, one_c, length, 40) == thought_memory_flops(
        config, ThoughtMemoryOptions(eos_id=0, memory_size=7, layer_pattern="SSSC"), length, 40)
    wide = config.replace(vocab_size=4100)
    parts = thought_memory_flops_breakdown(wide, one_c, length, tp=2)
    assert parts.head == 2 * h * wide.padded_vocab_size(2)
    assert parts.extra == pytest.approx((2 * (2 * m * h * 2 * h) + 2 * h * h) / length)


def test_planted_missing_memory_kv_fails(single_process_parallel, monkeypatch):
    """The formula without the K|V projection of the memory slots must not match the count."""
    original = tm_flops.thought_memory_flops_breakdown

    def planted(config, options, row_length, memory_size=None, tp=1):
        parts = original(config, options, row_length, memory_size, tp)
        m = options.memory_size if memory_size is None else memory_size
        c_layers = options.resolved(config.num_layers)[0].count("C")
        kv = c_layers * 2.0 * m * config.hidden_size * 2 * config.hidden_size
        return parts.__class__(parts.layers, parts.attention_scores, parts.head,
                               parts.extra - kv / row_length)

    monkeypatch.setattr(tm_flops, "thought_memory_flops_breakdown", planted)
    config = ModelConfig(num_layers=4, hidden_size=H, num_attention_heads=HEADS, vocab_size=64,
                         seq_length=L)
    options = ThoughtMemoryOptions(eos_id=LAYOUT.eos, memory_size=2)
    forward, _ = measure(make_model(config, options), make_batch(), backward=False)
    assert forward != pytest.approx(tm_flops.thought_memory_flops(config, options, L, 2, 1),
                                    rel=1e-6)
