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


def _all_gather_last_dim(tensor: Tensor, group) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _global_top_k(values: Tensor, top_k: int, group) -> tuple[Tensor, Tensor]:
    """Of each rank's local candidates [.., n] (sorted, no grad), which are in the global top-k.

    Returns (mask of this rank's candidates [.., n], global max [..]); every rank selects from
    the same gathered candidates, so all agree on the chosen set.
    """
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return values.new_ones(values.shape, dtype=torch.bool), values[..., 0]
    gathered = _all_gather_last_dim(values, group)
    chosen = gathered.topk(top_k, dim=-1).indices
    mask = torch.zeros_like(gathered, dtype=torch.bool).scatter_(-1, chosen, True)
    n, rank = values.shape[-1], dist.get_rank(group)
    return mask[..., rank * n:(rank + 1) * n], gathered.amax(dim=-1)


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


#: Rows x chosen tokens x hidden elements gathered at once by _WeightedRowSum (~256 MiB fp32).
ROW_SUM_CHUNK_ELEMENTS = 2**26


class _WeightedRowSum(torch.autograd.Function):
    """Σ_j w[i, j] · table[index[i, j]] for [N, n] weights and indices, in fp32: the top-k
    mixture. Gathers the chosen rows in bounded chunks (no [N, n, h] tensor is kept for the
    backward), and works for bf16 tables on CUDA, where embedding_bag's backward for
    per-sample weights does not exist. d w = rows · d out; d table = Σ w · d out, scattered
    back onto the chosen rows (accumulated in fp32)."""

    @staticmethod
    def _chunks(count: int, per_row: int) -> list[slice]:
        step = max(1, ROW_SUM_CHUNK_ELEMENTS // max(per_row, 1))
        return [slice(start, min(start + step, count)) for start in range(0, count, step)]

    @staticmethod
    def forward(ctx, weights: Tensor, index: Tensor, table: Tensor) -> Tensor:
        count, chosen = index.shape
        out = torch.empty(count, table.shape[1], dtype=torch.float32, device=table.device)
        for part in _WeightedRowSum._chunks(count, chosen * table.shape[1]):
            rows = table.index_select(0, index[part].reshape(-1)).view(-1, chosen, table.shape[1])
            out[part] = torch.bmm(weights[part].float().unsqueeze(1), rows.float()).squeeze(1)
        ctx.save_for_backward(weights, index, table)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, index, table = ctx.saved_tensors
        count, chosen = index.shape
        hidden = table.shape[1]
        grad = grad.float()
        grad_weights = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_weights = torch.empty(count, chosen, dtype=weights.dtype, device=weights.device)
        if ctx.needs_input_grad[2]:
            grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
        for part in _WeightedRowSum._chunks(count, chosen * hidden):
            flat_index = index[part].reshape(-1)
            if grad_weights is not None:
                rows = table.index_select(0, flat_index).view(-1, chosen, hidden).float()
                grad_weights[part] = torch.bmm(rows, grad[part].unsqueeze(-1)).squeeze(-1).to(
                    weights.dtype)
            if grad_table is not None:
                spread = weights[part].float().unsqueeze(-1) * grad[part].unsqueeze(1)
                grad_table.index_add_(0, flat_index, spread.view(-1, hidden))
        if grad_table is not None:
            grad_table = grad_table.to(table.dtype)
        return grad_weights, None, grad_table


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
        chosen, shift = _global_top_k(values.detach(), top_k, group if world > 1 else None)
        weights = torch.exp(values - shift.unsqueeze(-1)) * chosen.to(values.dtype)
        n = values.shape[-1]
        partial = _WeightedRowSum.apply(weights.reshape(-1, n), index.reshape(-1, n), table)
        partial = partial.view(s, b, -1)
        # Normaliser and partial mixture travel together, reduced in fp32.
        packed = torch.cat([partial.float(),
                            weights.sum(dim=-1, keepdim=True, dtype=torch.float32)], dim=-1)
    if sequence_parallel and world > 1:
        packed = reduce_scatter_to_sequence_parallel_region(packed, group=group)
    elif world > 1:
        packed = reduce_from_tensor_model_parallel_region(packed, group=group)
    return (packed[..., :-1] / packed[..., -1:]).to(table.dtype)
