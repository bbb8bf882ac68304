"""FLOPs of everything the thought-memory model executes for one sentence row.

Unit: forward FLOPs per *sentence row token slot* — one of the L positions of one [B, T] row,
pad positions included (the model runs every slot of every row, valid or not, so this is the
executed work; TFLOP/s = this × B × T × L per step / time). Matmuls only, 2 FLOPs per
multiply-add, as megatron_latent/flops.py; the embedding lookup, norms, softmax, the slot code,
the memory writes and the loss are free. `tp` only pads the vocabulary (the count is of the
whole model, not of one rank).

Per row of L slots, with h hidden, f ffn, V the padded vocabulary and M the memory capacity
(the memory is always read as M slots, empty ones zero and masked, so the work does not depend
on how full it is):

- each S layer: 2·L·(4h² + 2hf) for QKV, dense and MLP, plus 2·2·L·L·h for the attention
  scores and weighted values over the whole L×L (SDPA executes it; the causal half is not
  subtracted);
- each C layer: 2·L·(h² + h² + 2hf) for the Q projection, output projection and MLP on the L
  tokens; 2·M·h·2h for the K|V projection of the M memory slots; 2·M·h·2h for the slot-code
  term, which runs the whole `linear_kv` weight (K and V halves, the V half unused) on the M
  codes; and 2·2·L·M·h for the attention of L queries over M slots;
- the S_REP head: one h×h linear per row, 2·h²;
- the output layer: 2·L·h·V.

Divided by L for the per-slot figure. Training is reported as 3 × forward (backward =
2 × forward), the usual convention; what the backward actually executes is 3 × forward less
`backward_deficit_per_slot`: the slot-code term (a plain F.linear) has a constant input, so
autograd runs only its weight gradient (1 × instead of 2 ×). The memory K|V projection runs
its input gradient even at t = 0, where the memory is a fresh zero tensor without gradient:
megatron-core's linear autograd function computes grad_input unconditionally.
"""

from __future__ import annotations

from ...config import ModelConfig
from ...flops import FlopsBreakdown
from .model import ThoughtMemoryOptions


def thought_memory_flops_breakdown(config: ModelConfig, options: ThoughtMemoryOptions,
                                   row_length: int, memory_size: int | None = None,
                                   tp: int = 1) -> FlopsBreakdown:
    """Forward FLOPs per sentence row token slot, by part: `layers` the per-token weight
    matmuls of the S and C layers, `attention_scores` the S (L×L) and C (L×M) attention,
    `head` the output layer, `extra` the per-row memory work (K|V and slot-code projections
    of the M slots) and the S_REP linear, spread over the L slots."""
    pattern, _ = options.resolved(config.num_layers)
    m = options.memory_size if memory_size is None else memory_size
    length = row_length
    h, f = config.hidden_size, config.ffn_hidden_size
    vocab = config.padded_vocab_size(tp)
    s_layers, c_layers = pattern.count("S"), pattern.count("C")
    layers = (s_layers * 2.0 * (4 * h * h + 2 * h * f)
              + c_layers * 2.0 * (2 * h * h + 2 * h * f))
    attention = (s_layers * 2.0 * 2.0 * length * h
                 + c_layers * 2.0 * 2.0 * m * h)
    memory_kv = c_layers * 2.0 * m * h * (2 * h)
    slot_code = c_layers * 2.0 * m * h * (2 * h)
    s_rep = 2.0 * h * h
    return FlopsBreakdown(
        layers=layers,
        attention_scores=attention,
        head=2.0 * h * vocab,
        extra=(memory_kv + slot_code + s_rep) / length,
    )


def thought_memory_flops(config: ModelConfig, options: ThoughtMemoryOptions, row_length: int,
                         memory_size: int | None = None, tp: int = 1) -> float:
    """Forward FLOPs per sentence row token slot (see the module doc); training = 3 ×."""
    return thought_memory_flops_breakdown(config, options, row_length, memory_size, tp).forward


def backward_deficit_per_slot(config: ModelConfig, options: ThoughtMemoryOptions,
                              row_length: int, memory_size: int | None = None) -> float:
    """FLOPs per slot that 3 × forward counts but the backward does not execute: the input
    gradient of the slot-code term W·pe (pe is a constant), 2·M·h·2h per C layer and row."""
    pattern, _ = options.resolved(config.num_layers)
    m = options.memory_size if memory_size is None else memory_size
    h, c_layers = config.hidden_size, pattern.count("C")
    return c_layers * 2.0 * m * h * (2 * h) / row_length


__all__ = ["backward_deficit_per_slot", "thought_memory_flops", "thought_memory_flops_breakdown"]
