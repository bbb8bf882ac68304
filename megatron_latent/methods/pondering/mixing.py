"""T = softmax(logits) · W_in with both sharded over the vocabulary across TP ranks: each rank
mixes its own shard and only [tokens, h + 1] partial sums cross the TP group (full-vocabulary
mixing, or the global top-k)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from torch import Tensor

from ...models.sharded_topk import WeightedRowSum, global_top_k


def _matmul_fp32(left: Tensor, right: Tensor) -> Tensor:
    """left @ right accumulated and returned in fp32, also for bf16/fp16 inputs: on CUDA the
    matmul writes fp32 directly (no copy of the inputs); elsewhere the inputs are upcast."""
    if left.dtype == torch.float32 and right.dtype == torch.float32:
        return torch.mm(left, right)
    if left.is_cuda:
        try:
            return torch.mm(left, right, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass  # a torch without fp32-output matmuls for this dtype
    return torch.mm(left.float(), right.float())


class _ExpWeightedRows(torch.autograd.Function):
    """[e · W, Σ e] with e = exp(logits - shift), packed as [.., h + 1] in fp32.

    The same as autograd through exp, matmul and sum, with two fewer full-vocabulary
    temporaries: e is exponentiated in place and saved alone, and the backward
    d logits = e ⊙ (dU · Wᵀ + dz) is one addmm and an in-place multiply.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, shift: Tensor, table: Tensor) -> Tensor:
        weights = (logits - shift.unsqueeze(-1)).exp_()
        flat = weights.view(-1, weights.shape[-1])
        packed = torch.cat([_matmul_fp32(flat, table),
                            flat.sum(-1, keepdim=True, dtype=torch.float32)], dim=-1)
        ctx.save_for_backward(weights, table)
        return packed.view(*weights.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, table = ctx.saved_tensors
        flat = weights.view(-1, weights.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1]).to(weights.dtype)
        grad_mixed, grad_total = grad[:, :-1], grad[:, -1:]
        grad_logits = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.addmm(grad_total, grad_mixed, table.t()).mul_(flat)
            grad_logits = grad_logits.view_as(weights)
        if ctx.needs_input_grad[2]:
            grad_table = torch.mm(flat.t(), grad_mixed)
        return grad_logits, None, grad_table


def mix_input_embeddings(
    logits: Tensor,
    table: Tensor,
    top_k: int = 0,
    sequence_parallel: bool = False,
    group=None,
) -> Tensor:
    """T = softmax(logits) · W_in with both sharded over the vocabulary across TP ranks.

    logits: this rank's shard [s, b, V/tp] for the full sequence; table: this rank's rows of
    W_in [V/tp, h]. Returns [s, b, h], or this rank's sequence shard [s/tp, b, h] under
    sequence parallelism. With top_k > 0 only the top_k most probable tokens take part,
    renormalised. Each rank forms unnormalised partial sums (Σ e·W_in, Σ e) with e =
    exp(logits - global max); one all-reduce (reduce-scatter under SP) adds them; the division
    happens after. The max is detached: softmax does not depend on it.
    """
    if group is None and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group) if group is not None else 1
    s, b, local_vocab = logits.shape
    if top_k == 0:
        shift = logits.detach().amax(dim=-1)
        if world > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
        packed = _ExpWeightedRows.apply(logits, shift, table)
    else:
        values, index = torch.topk(logits, min(top_k, local_vocab), dim=-1)
        chosen, shift = global_top_k(values.detach(), top_k, group if world > 1 else None)
        weights = torch.exp(values - shift.unsqueeze(-1)) * chosen.to(values.dtype)
        n = values.shape[-1]
        partial = WeightedRowSum.apply(weights.reshape(-1, n), index.reshape(-1, n), table)
        partial = partial.view(s, b, -1)
        # Normaliser and partial mixture travel together, reduced in fp32.
        packed = torch.cat([partial.float(),
                            weights.sum(dim=-1, keepdim=True, dtype=torch.float32)], dim=-1)
    if sequence_parallel and world > 1:
        packed = reduce_scatter_to_sequence_parallel_region(packed, group=group)
    elif world > 1:
        packed = reduce_from_tensor_model_parallel_region(packed, group=group)
    return (packed[..., :-1] / packed[..., -1:]).to(table.dtype)
