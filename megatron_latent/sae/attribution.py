"""Attribution concept labels of a frozen teacher (CoCoMix's ``concept_extractor``, exactly).

Per teacher window of T tokens: one forward; L = mean shifted next-token CE over the window's
T − 1 predictions; g = ∂L/∂h at the raw residual h after block ``layer`` (0-based; the blocks
above, the final norm and the output head run on h); z = the SAE's exact encode of h; score =
(g · W_decᵀ) ⊙ z, [T, C], signed and non-zero only on active latents; labels = the ids of the
K_attr largest scores per position (ties to the lowest id, ids in increasing order), scores
gathered beside them. Windows are independent, so a batch of B windows gives each window the
gradient of its own mean (the code's batch mean × B: the same ranking per position). The last
position has g = 0 (no later token is predicted from it): its labels get weight 0, as do
labels below ``min_score`` when given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .encode import TopKSAE, topk_indices

K_ATTR = 4

#: ids [b, s] -> (h [b, s, d] the residual after the layer, logits_of(h) -> [b, s, V]).
SplitTeacher = Callable[[Tensor], tuple[Tensor, Callable[[Tensor], Tensor]]]


@dataclass
class WindowLabels:
    """Labels of a batch of windows: ``ids`` int64 [b, s, K], ``scores`` fp32 [b, s, K],
    ``weights`` uint8 [b, s, K] (0 for the last position and filtered labels)."""

    ids: Tensor
    scores: Tensor
    weights: Tensor


def window_loss(logits: Tensor, ids: Tensor, vocab_group=None) -> Tensor:
    """Σ over windows of each window's mean shifted next-token CE (logits [b, s, V], or this
    rank's vocabulary shard [b, s, V/tp] of a tensor-parallel teacher with `vocab_group`)."""
    b, s = ids.shape
    if vocab_group is not None:
        from ..models.sharded_loss import sharded_cross_entropy

        ce = sharded_cross_entropy(logits[:, :-1], ids[:, 1:, None], vocab_group)
        return ce.view(b, s - 1).mean(dim=1).sum()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                         ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(b, s - 1).mean(dim=1).sum()


def attribution_scores(sae: TopKSAE, h: Tensor, grad: Tensor) -> Tensor:
    """(g · W_decᵀ) ⊙ z for residuals h and gradients g [..., d] -> [..., C]."""
    z, _, _ = sae.encode_with_stats(h)
    return (grad @ sae.W_dec.t()) * z


def labels_from_scores(scores: Tensor, k_attr: int = K_ATTR,
                       min_score: float | None = None) -> WindowLabels:
    """Top-``k_attr`` ids (lowest id on ties) of scores [b, s, C], with their scores and weights
    (0 at the last position of every window and, with ``min_score``, below it)."""
    ids = topk_indices(scores, k_attr)
    picked = scores.gather(-1, ids)
    weights = torch.ones_like(ids, dtype=torch.uint8)
    weights[:, -1] = 0
    if min_score is not None:
        weights[picked < min_score] = 0
    return WindowLabels(ids, picked.float(), weights)


def label_windows(teacher: SplitTeacher, sae: TopKSAE, ids: Tensor, k_attr: int = K_ATTR,
                  min_score: float | None = None) -> WindowLabels:
    """Attribution labels of token windows ids [b, s] (s ≥ 2) under a split teacher."""
    if ids.shape[1] < 2:
        raise ValueError("a teacher window needs at least 2 tokens")
    with torch.no_grad():
        h0, logits_of = teacher(ids)
    h = h0.detach().float().requires_grad_(True)
    with torch.enable_grad():
        loss = window_loss(logits_of(h), ids.to(h.device), getattr(teacher, "vocab_group", None))
        (grad,) = torch.autograd.grad(loss, h)
    with torch.no_grad():
        scores = attribution_scores(sae, h.detach(), grad)
        return labels_from_scores(scores, k_attr, min_score)


def split_project_teacher(model: torch.nn.Module, layer: int) -> SplitTeacher:
    """A PythiaModel (fp32, eval, frozen) split at the residual after block ``layer``; under
    tensor parallelism (no sequence parallelism) h and g are whole on every rank and the
    logits are vocabulary shards (the returned function's ``vocab_group``)."""
    from .activations import residual_after_layer

    layers = model.decoder.layers

    def run(ids: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        h = residual_after_layer(model, ids, layer)

        def logits_of(hidden: Tensor) -> Tensor:
            x = hidden.transpose(0, 1)
            rotary = model.rotary_pos_emb(ids.shape[1], device=x.device)
            for block in layers[layer + 1:]:
                x, _ = block(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary)
            norm = getattr(model.decoder, "final_layernorm", None)
            if norm is not None:
                x = norm(x)
            return model.output_logits(x).transpose(0, 1)

        return h, logits_of

    tp = model.config.tensor_model_parallel_size
    run.vocab_group = model.tp_group if tp > 1 else None
    return run


def split_hf_teacher(model: torch.nn.Module, layer: int) -> SplitTeacher:
    """A Hugging Face GPTNeoXForCausalLM split at the output of ``gpt_neox.layers[layer]``: the
    forward is run once with the layer's output replaced by the given h."""
    base = model.gpt_neox
    layers = base.layers

    class _Stop(Exception):
        pass

    def first(ids: Tensor) -> Tensor:
        captured: list[Tensor] = []

        def hook(_m, _i, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = layers[layer].register_forward_hook(hook)
        try:
            base(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    def run(ids: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        h = first(ids)

        def logits_of(hidden: Tensor) -> Tensor:
            def replace(_m, _i, output):
                if isinstance(output, tuple):
                    return (hidden,) + tuple(output[1:])
                return hidden

            handle = layers[layer].register_forward_hook(replace)
            try:
                return model(input_ids=ids, use_cache=False).logits
            finally:
                handle.remove()

        return h, logits_of

    return run
