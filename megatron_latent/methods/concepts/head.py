"""The concept head (../shared/methods/cocomix.md, "Student", decision 6), sharded over the
C concepts across TP ranks like the vocabulary-parallel output head.

From the residual stream h [s, b, d] at the insertion point:

- (x, μ, σ) = the SAE's own normalisation of h: μ = mean(h), σ = std(h, unbiased) + 1e-5;
- z = W_head (x − p) + b_head, C logits per token (column-parallel: each rank holds C/tp);
- concept loss: mean over the K teacher labels of a softmax cross-entropy over the C concepts
  (`sharded_cross_entropy`: no rank ever holds all C logits);
- continuous concept: the 32 largest z (global top-k over ranks, raw values, no ReLU), then
  ĉ = Σ z_j W_comp[j] + b_comp + p, with only the chosen rows of this rank's [C/tp, d] table
  touched (a weighted row sum, then one all-reduce, or a reduce-scatter under sequence
  parallelism); finally de-normalised with h's own statistics: ĉ·σ + μ.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from ...models.sharded_loss import sharded_cross_entropy
from ...models.sharded_topk import WeightedRowSum, global_top_k

#: The SAE normalisation's epsilon, added to the unbiased standard deviation (not a LayerNorm).
SIGMA_EPS = 1e-5
#: The head's and the compression's initialisation (GPT-2's N(0, 0.02); biases 0).
INIT_STD = 0.02


def concept_norm(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x, μ, σ) over the last dimension: μ = mean, σ = unbiased std + 1e-5, x = (h − μ)/σ,
    computed in fp32 (μ, σ keep a trailing 1 to broadcast)."""
    h32 = h.float()
    mu = h32.mean(dim=-1, keepdim=True)
    sigma = h32.std(dim=-1, keepdim=True) + SIGMA_EPS
    return (h32 - mu) / sigma, mu, sigma


class ConceptHead(MegatronModule):
    """Concept prediction and compression for C concepts (C/tp on each TP rank).

    Parameters: `linear` (ColumnParallelLinear d→C with bias), `pre_bias` p [d] (replicated,
    init 0), `compress` (its weight is this rank's rows of the C→d compression, [C/tp, d]) and
    `compress_bias` [d]. `steering` {concept id: scale} multiplies chosen logits before the
    top-k (generation-time steering, as the paper describes; empty during training).
    """

    def __init__(self, config, num_concepts: int, top_k: int, tp_group=None):
        super().__init__(config=config)
        hidden = config.hidden_size
        tp = config.tensor_model_parallel_size
        if num_concepts % tp:
            raise ValueError(f"{num_concepts} concepts do not divide over TP {tp}")

        def init(tensor: Tensor) -> Tensor:
            return torch.nn.init.normal_(tensor, mean=0.0, std=INIT_STD)

        self.num_concepts, self.top_k, self.tp_group = num_concepts, top_k, tp_group
        self.linear = ColumnParallelLinear(
            hidden, num_concepts, config=config, init_method=init, bias=True,
            skip_bias_add=False, gather_output=False, tp_group=tp_group)
        self.compress = VocabParallelEmbedding(
            num_embeddings=num_concepts, embedding_dim=hidden, init_method=init,
            config=config, tp_group=tp_group)
        device = self.compress.weight.device
        self.pre_bias = torch.nn.Parameter(
            torch.zeros(hidden, dtype=config.params_dtype, device=device))
        self.compress_bias = torch.nn.Parameter(
            torch.zeros(hidden, dtype=config.params_dtype, device=device))
        for param in (self.pre_bias, self.compress_bias):
            # Under sequence parallelism each rank sees a slice of the tokens: the engines
            # all-reduce these replicated parameters' gradients over TP.
            param.sequence_parallel = config.sequence_parallel
        self.steering: dict[int, float] = {}

    @property
    def shard_start(self) -> int:
        return self.compress.vocab_start_index

    def logits(self, x: Tensor) -> Tensor:
        """Concept logits z [s, b, C/tp] (the full sequence) from normalised x [s(/tp), b, d]."""
        z, _ = self.linear((x - self.pre_bias.float()).to(self.linear.weight.dtype))
        if self.steering:
            z = self._steer(z)
        return z

    def _steer(self, z: Tensor) -> Tensor:
        scale = torch.ones(z.shape[-1], dtype=z.dtype, device=z.device)
        for concept, factor in self.steering.items():
            local = concept - self.shard_start
            if 0 <= local < z.shape[-1]:
                scale[local] = factor
        return z * scale

    def loss(self, z: Tensor, concept_ids: Tensor) -> Tensor:
        """CE over the C concepts of each of K labels [s, b, K] -> [s, b, K] (fp32)."""
        return sharded_cross_entropy(z, concept_ids, self._group())

    def _group(self):
        return self.tp_group if self.config.tensor_model_parallel_size > 1 else None

    def continuous(self, z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        """ĉ [s(/tp), b, d] in fp32: the global top-k of z compressed, p added, de-normalised
        with the statistics (μ, σ) [s(/tp), b, 1] of the tokens this rank holds."""
        group = self._group()
        local = z.shape[-1]
        values, index = torch.topk(z, min(self.top_k, local), dim=-1)
        chosen, _ = global_top_k(values.detach(), self.top_k, group)
        weights = values * chosen.to(values.dtype)
        n = values.shape[-1]
        partial = WeightedRowSum.apply(weights.reshape(-1, n), index.reshape(-1, n),
                                       self.compress.weight).view(*z.shape[:-1], -1)
        if group is not None and self.config.sequence_parallel:
            partial = reduce_scatter_to_sequence_parallel_region(partial, group=group)
        elif group is not None:
            partial = reduce_from_tensor_model_parallel_region(partial, group=group)
        c_hat = partial + self.compress_bias.float() + self.pre_bias.float()
        return c_hat * sigma + mu


__all__ = ["ConceptHead", "INIT_STD", "SIGMA_EPS", "concept_norm"]
