"""Top-k over a dimension sharded across TP ranks, and the weighted sum of the chosen rows of
a sharded table: the pieces shared by pondering's top-k mixture and the concept head's
continuous concept (each rank holds a slice of the vocabulary or of the concepts)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_gather_last_dim(tensor: Tensor, group) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def global_top_k(values: Tensor, top_k: int, group) -> tuple[Tensor, Tensor]:
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


#: Rows x chosen tokens x hidden elements gathered at once by WeightedRowSum (~256 MiB fp32).
ROW_SUM_CHUNK_ELEMENTS = 2**26


class WeightedRowSum(torch.autograd.Function):
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
        for part in WeightedRowSum._chunks(count, chosen * table.shape[1]):
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
        for part in WeightedRowSum._chunks(count, chosen * hidden):
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


__all__ = ["ROW_SUM_CHUNK_ELEMENTS", "WeightedRowSum", "global_top_k"]
