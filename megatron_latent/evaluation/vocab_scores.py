"""Exact log-probabilities and greedy ids over a TP-sharded vocabulary.

Its own module so that scoring code that does not drive lm-eval (a method's
score_continuations hook) can use it on hosts without lm-eval installed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import tp_group, tp_rank, tp_size


def _all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(tp_size())]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group())
    return torch.stack(parts)


def vocab_parallel_scores(logits: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), argmax) per row of this rank's vocab shard of logits [n, V/tp].

    Exact over the whole vocabulary on every TP rank: max, sum of exponentials and the
    target's logit are reduced over the TP group; argmax ties go to the lowest id, as torch's.
    """
    logits = logits.float()
    local_arg = logits.argmax(dim=-1)
    if tp_size() == 1:
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1), local_arg
    shard = logits.shape[-1]
    start = tp_rank() * shard
    local_max = logits.gather(-1, local_arg.unsqueeze(-1)).squeeze(-1)
    maxes = _all_gather_stacked(local_max)  # [tp, n]
    args = _all_gather_stacked(local_arg + start)
    best = maxes.argmax(dim=0, keepdim=True)  # first (lowest-id) shard on ties
    top = maxes.gather(0, best)[0]
    argmax = args.gather(0, best)[0]
    sum_exp = torch.exp(logits - top.unsqueeze(-1)).sum(dim=-1)
    dist.all_reduce(sum_exp, group=tp_group())
    mine = (targets >= start) & (targets < start + shard)
    local = (targets - start).clamp(0, shard - 1).unsqueeze(-1)
    picked = torch.where(mine, logits.gather(-1, local).squeeze(-1), 0.0)
    dist.all_reduce(picked, group=tp_group())
    return picked - top - sum_exp.log(), argmax
