"""Thought-memory building blocks: slot code, memory cross-attention, the gated C layer, the
sentence-vector head (S_REP) and the FIFO memory (../shared/methods/thought_gestalt.md).

Layouts follow megatron-core: tokens [s, b, h], memory [M, b, h] left-aligned (slot 0 = the
oldest entry present) with a per-row count of filled slots [b].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from ...models.layers import (
    LayerNorm,
    ParallelResidualLayer,
    ParallelResidualLayerSubmodules,
    SDPACoreAttention,
)


def slot_position_code(num_slots: int, hidden: int, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """Key-only slot code [num_slots, hidden]: sinusoid of the slot index (even dims sin, odd
    dims cos, base 10000), each row scaled to unit L2 norm (the norm of a memory entry)."""
    positions = torch.arange(num_slots, dtype=torch.float64, device=device)[:, None]
    pair = torch.arange(0, hidden, 2, dtype=torch.float64, device=device)
    angles = positions / (10000.0 ** (pair / hidden))  # [num_slots, ceil(hidden / 2)]
    code = torch.zeros(num_slots, hidden, dtype=torch.float64, device=device)
    code[:, 0::2] = torch.sin(angles)
    code[:, 1::2] = torch.cos(angles[:, : hidden // 2])
    return F.normalize(code, dim=-1).to(dtype)


def slot_indices(counts: Tensor, num_slots: int, newest_first: bool = False) -> Tensor:
    """Slot index of each memory position [num_slots, b]: the position itself (slot 0 = oldest
    present) or, with `newest_first`, count-1-position (newest = 0). Empty positions get 0."""
    position = torch.arange(num_slots, device=counts.device)[:, None].expand(-1, counts.numel())
    if newest_first:
        return (counts[None, :] - 1 - position).clamp(min=0)
    return position


class MemoryCrossAttention(CrossAttention):
    """Tensor-parallel cross-attention from tokens to memory slots (heads split over TP ranks).

    q = W_q x + b_q; k = W_k m + b_k + W_k pe; v = W_v m + b_v (K and V from the one
    megatron-core `linear_kv`, pe added after projection); no causal mask, only empty slots are
    masked; rows with no filled slot get exactly 0. `forward` returns (output with the
    projection bias folded in, None) so a gate can scale output and bias together.
    """

    def __init__(self, config: TransformerConfig, submodules: CrossAttentionSubmodules,
                 layer_number: int = 1, newest_first: bool = False, **kwargs: Any):
        kwargs.pop("attn_mask_type", None)
        super().__init__(config, submodules, layer_number, attn_mask_type=AttnMaskType.no_mask,
                         **kwargs)
        self.newest_first = newest_first

    def forward(self, hidden_states: Tensor, memory: Tensor, counts: Tensor,
                **_: Any) -> tuple[Tensor, None]:
        """hidden_states [s, b, h], memory [M, b, h], counts [b] -> ([s, b, h], None)."""
        num_slots, batch = memory.shape[:2]
        heads, head_dim = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        has_memory = counts > 0
        if num_slots == 0:
            return hidden_states.new_zeros(hidden_states.shape), None
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:-1], heads, head_dim)
        mixed_kv, _ = self.linear_kv(memory)
        code = slot_position_code(num_slots, memory.shape[-1], memory.device, memory.dtype)
        code = code[slot_indices(counts, num_slots, self.newest_first)]  # [M, b, h]
        mixed_kv = mixed_kv.view(num_slots, batch, heads, 2 * head_dim)
        # W_k pe with the local shard of linear_kv's weight (pe is the same on every rank);
        # megatron's kv layout is per head [key | value], so the key half is [..., :head_dim].
        pe_kv = F.linear(code, self.linear_kv.weight).view(num_slots, batch, heads, 2 * head_dim)
        key = mixed_kv[..., :head_dim] + pe_kv[..., :head_dim]
        value = mixed_kv[..., head_dim:]
        empty = torch.arange(num_slots, device=counts.device)[None, :] >= counts[:, None]
        empty = empty & has_memory[:, None]  # an empty row attends to slot 0, output zeroed
        context = self.core_attention(query, key, value, attention_mask=empty[:, None, None, :],
                                      attn_mask_type=AttnMaskType.no_mask)
        keep = has_memory[None, :, None]
        context = torch.where(keep, context, torch.zeros((), dtype=context.dtype,
                                                         device=context.device))
        output, bias = self.linear_proj(context)
        if bias is not None:
            output = output + torch.where(keep, bias, torch.zeros((), dtype=bias.dtype,
                                                                  device=bias.device))
        return output, None


class ReplicatedInputColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel linear whose input is whole on every TP rank even under sequence
    parallelism (the memory is not split along the sequence): its input is never gathered,
    and its input gradient is summed over the TP group as without sequence parallelism."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sequence_parallel = False
        self.allreduce_dgrad = (parallel_state.get_tensor_model_parallel_world_size() > 1
                                and not self.disable_grad_reduce)


def memory_cross_attention_spec(newest_first: bool = False) -> ModuleSpec:
    """Local (megatron-core linears, SDPA core attention) spec of the memory cross-attention."""
    return ModuleSpec(
        module=MemoryCrossAttention,
        params={"newest_first": newest_first},
        submodules=CrossAttentionSubmodules(
            linear_q=ColumnParallelLinear,
            linear_kv=ReplicatedInputColumnParallelLinear,
            core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear,
        ),
    )


@dataclass
class GatedCrossAttentionLayerSubmodules(ParallelResidualLayerSubmodules):
    """Slots of a C layer: the parallel-residual slots (self-attention an identity) plus the
    memory cross-attention."""

    self_attention: ModuleSpec | type | None = IdentityOp
    cross_attention: ModuleSpec | type | None = None


class GatedCrossAttentionLayer(ParallelResidualLayer):
    """C layer in parallel-residual form: x + g * xattn(LN1 x, memory) + mlp(LN2 x).

    g is one learnable scalar stored as a 1-element 1-D parameter (init 1.0) so megatron's
    rule (and the CPU engine's) puts it in the no-weight-decay group. It scales the
    cross-attention output and bias before dropout and the residual add. The memory comes in
    as `context` [M, b, h] and the per-row filled-slot counts [b] as `context_mask` (the two
    arguments megatron-core's TransformerBlock hands every layer).
    """

    def __init__(self, config: TransformerConfig, submodules: GatedCrossAttentionLayerSubmodules,
                 layer_number: int = 1, hidden_dropout: float | None = None,
                 pg_collection: Any = None, vp_stage: int | None = None, **kwargs: Any):
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection,
                         vp_stage, **kwargs)
        attention_kwargs: dict[str, Any] = {"layer_number": self.layer_number}
        if pg_collection is not None:
            attention_kwargs["pg_collection"] = pg_collection
        self.cross_attention = build_module(submodules.cross_attention, config=config,
                                            **attention_kwargs)
        self.gate = torch.nn.Parameter(torch.ones(1, dtype=config.params_dtype))
        # under sequence parallelism each rank's gate gradient covers its sequence shard only
        self.gate.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                **_: Any) -> tuple[Tensor, Tensor | None]:
        if context is None or context_mask is None:
            raise ValueError("a C layer needs the memory (context) and its counts (context_mask)")
        xattn_out, _ = self.cross_attention(self.input_layernorm(hidden_states), context,
                                            context_mask)
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        output = (
            hidden_states
            + self._add_dropout(self.gate * xattn_out, None)
            + self._add_dropout(mlp_out, mlp_bias)
        )
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad,
                                      keep_graph=True)
        return output, context


def gated_cross_attention_layer_spec(newest_first: bool = False) -> ModuleSpec:
    """Local spec of a C layer (the Pythia norms and MLP of models/specs.py, no self-attention)."""
    return ModuleSpec(
        module=GatedCrossAttentionLayer,
        submodules=GatedCrossAttentionLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=IdentityOp,
            cross_attention=memory_cross_attention_spec(newest_first),
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
        ),
    )


class SentenceVectorHead(torch.nn.Module):
    """S_REP: LN(affine) -> dropout -> Linear(h, h, bias) -> L2-normalise.

    Returns (unit vectors [n, h], hinge) with hinge = weight * mean over valid rows of
    max(low - |s|, 0)^2 + max(|s| - high, 0)^2 on the pre-normalisation norm |s|. The linear is
    replicated on every TP rank (it is h x h); `dropout` may be changed between steps (ramp).
    """

    def __init__(self, config: TransformerConfig, dropout: float = 0.0, hinge_weight: float = 0.01,
                 low: float = 0.9, high: float = 1.1):
        super().__init__()
        h = config.hidden_size
        self.norm = LayerNorm(config, h, eps=config.layernorm_epsilon)
        for param in self.norm.parameters():  # it sees whole rows on every rank, also under
            param.sequence_parallel = False  # sequence parallelism: nothing to sum over TP
        self.linear = torch.nn.Linear(h, h, bias=True, dtype=config.params_dtype)
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.linear.weight)
                self.linear.bias.zero_()
        self.dropout = dropout
        self.hinge_weight, self.low, self.high = hinge_weight, low, high

    def forward(self, hidden: Tensor, valid: Tensor | None = None,
                row_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """hidden [n, h] (the residual stream at each row's first EOS), valid [n] bool.

        With `row_weights` [n] the hinge is weight * Σ penalty * row_weights (the caller
        normalises, e.g. over a whole global batch) instead of the mean over valid rows."""
        s = self.linear(F.dropout(self.norm(hidden), self.dropout, self.training))
        norm = s.norm(dim=-1)
        penalty = (self.low - norm).clamp(min=0) ** 2 + (norm - self.high).clamp(min=0) ** 2
        if row_weights is not None:
            hinge = self.hinge_weight * (penalty * row_weights.to(penalty.dtype)).sum()
            return s / norm.clamp(min=1e-12)[:, None], hinge
        if valid is None:
            valid = torch.ones_like(norm, dtype=torch.bool)
        weight = valid.to(penalty.dtype)
        hinge = self.hinge_weight * (penalty * weight).sum() / weight.sum().clamp(min=1.0)
        return s / norm.clamp(min=1e-12)[:, None], hinge


class FifoMemory:
    """Up to `capacity` vectors per stream row, oldest -> newest, kept in the autograd graph.

    `write(vectors, mask)` appends vectors [b, h] for rows where mask [b] (valid and has EOS)
    is set, dropping the oldest entry of a full row; `read()` returns (m [capacity, b, h]
    left-aligned oldest first, zero in empty slots; counts [b] long). Writes are out of place,
    so a later read differentiates back into every vector still held.
    """

    def __init__(self, capacity: int, batch: int, hidden: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError(f"memory capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.memory = torch.zeros(capacity, batch, hidden, device=device, dtype=dtype)
        self.counts = torch.zeros(batch, dtype=torch.long, device=device)

    def write(self, vectors: Tensor, mask: Tensor) -> None:
        mask = mask.to(torch.bool)
        full = self.counts == self.capacity
        shifted = torch.cat([self.memory[1:], torch.zeros_like(self.memory[:1])])
        memory = torch.where((full & mask)[None, :, None], shifted, self.memory)
        target = torch.where(full, self.capacity - 1, self.counts)
        slot = torch.arange(self.capacity, device=self.counts.device)[:, None]
        place = (slot == target[None, :]) & mask[None, :]
        self.memory = torch.where(place[..., None], vectors[None].to(memory.dtype), memory)
        self.counts = (self.counts + mask.long()).clamp(max=self.capacity)

    def read(self) -> tuple[Tensor, Tensor]:
        return self.memory, self.counts


__all__ = [
    "FifoMemory",
    "GatedCrossAttentionLayer",
    "GatedCrossAttentionLayerSubmodules",
    "MemoryCrossAttention",
    "SentenceVectorHead",
    "gated_cross_attention_layer_spec",
    "memory_cross_attention_spec",
    "slot_indices",
    "slot_position_code",
]
