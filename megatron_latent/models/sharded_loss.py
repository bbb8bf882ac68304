"""Cross-entropy over classes sharded across TP ranks, for several targets per row at once:
the concept head's K labels over C/tp concepts per rank, and a tensor-parallel teacher's
next-token loss over its vocabulary shards."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _tp_world(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


class _ShardedCrossEntropy(torch.autograd.Function):
    """CE of K targets per row over classes sharded across `group` ([n, C/tp] logits per
    rank): one max and one sum-of-exponentials reduction serve all K targets, and only the
    fp32 softmax of this rank's shard is kept for the backward (no collective there)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group) -> Tensor:
        world = _tp_world(group)
        local = logits.shape[-1]
        start = (dist.get_rank(group) if world > 1 else 0) * local
        probs = logits.float()
        if probs.data_ptr() == logits.data_ptr():
            probs = probs.clone()
        mine = (targets >= start) & (targets < start + local)
        index = (targets - start).clamp(0, local - 1)
        picked = torch.where(mine, probs.gather(-1, index), 0.0)  # z_target on its owner
        top = probs.amax(dim=-1)
        if world > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        probs.sub_(top.unsqueeze(-1)).exp_()
        total = probs.sum(dim=-1)
        if world > 1:
            dist.all_reduce(total, group=group)
            dist.all_reduce(picked, group=group)
        probs.div_(total.unsqueeze(-1))
        ctx.save_for_backward(probs, index, mine)
        ctx.logits_dtype = logits.dtype
        return (total.log() + top).unsqueeze(-1) - picked

    @staticmethod
    def backward(ctx, grad: Tensor):
        probs, index, mine = ctx.saved_tensors
        grad = grad.float()
        out = probs.mul_(grad.sum(dim=-1, keepdim=True))
        out.scatter_add_(-1, index, -(grad * mine))
        return out.to(ctx.logits_dtype), None, None


def sharded_cross_entropy(logits: Tensor, targets: Tensor, group=None) -> Tensor:
    """Cross-entropy [..., K] of each of K targets (global class ids) against logits [..., C/tp]
    sharded over classes across `group` (None: not sharded)."""
    shape = targets.shape
    ce = _ShardedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]),
                                    targets.reshape(-1, shape[-1]), group)
    return ce.view(shape)


__all__ = ["sharded_cross_entropy"]
