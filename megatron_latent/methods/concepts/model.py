"""The concept model (CoCoMix; ../shared/methods/cocomix.md "Student", decisions 5-9).

Blocks [0, insert) run on the T tokens. At the insertion point the concept head reads the
residual stream h, predicts C concept logits z (trained against the teacher's labels) and
turns its top-k into a continuous concept ĉ (head.py). With `interleave` (the method) the
blocks from `insert` on run on the 2T sequence h_1, ĉ_1, h_2, ĉ_2, … under the ordinary causal
mask, at rotary positions 0,0,1,1,… (`pair`) or 0..2T−1 (`sequential`), and only the ĉ slots
feed the final LayerNorm and the output head (predicting x_{t+1}); the h slots' outputs are
dropped, their keys and values still serve later queries. With `add` (an ablation) ĉ_t is added
to h_t and the upper blocks run on T.

Under sequence parallelism each rank holds a contiguous chunk of the tokens; interleaving
within it gives the matching chunk of the 2T sequence, so pairs never straddle ranks.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor

from ...config import ConfigError, ModelConfig
from ...models.language_model import PythiaModel
from .head import ConceptHead, concept_norm
from .options import PIPELINE_REFUSAL, ConceptOptions

#: aux key of λ × the concept loss (a per-micro-batch mean, added to the optimised loss).
SCALED_LOSS_KEY = "scaled_concept_loss"
#: aux key of the concept loss itself (logged, not optimised again).
CONCEPT_CE_KEY = "concept_ce"


class ConceptInferenceContext:
    """KV caches for cached generation: the lower blocks cache T positions, the upper blocks
    (interleaved) 2T: one token step appends one position below and two (h, ĉ) above."""

    def __init__(self, max_batch_size: int, max_sequence_length: int, interleaved: bool):
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.factor = 2 if interleaved else 1
        self.lower = StaticInferenceContext(max_batch_size, max_sequence_length)
        self.upper = StaticInferenceContext(max_batch_size, self.factor * max_sequence_length)

    @property
    def sequence_len_offset(self) -> int:
        return self.lower.sequence_len_offset

    def increment_sequence_len_offset(self, increment: int) -> None:
        self.lower.increment_sequence_len_offset(increment)
        self.upper.increment_sequence_len_offset(self.factor * increment)

    def reset(self) -> None:
        self.lower.reset()
        self.upper.reset()


def interleave(h: Tensor, c: Tensor) -> Tensor:
    """[s, b, d] twice -> [2s, b, d] as h_1, c_1, h_2, c_2, …"""
    return torch.stack([h, c], dim=1).reshape(2 * h.shape[0], *h.shape[1:])


class ConceptModel(PythiaModel):
    """PythiaModel with a concept head and continuous-concept mixing at `insert_layer`.

    The parameters are PythiaModel's (same names) plus `concepts.*` (head.ConceptHead).
    `forward` drives the decoder's layers itself; full recompute and pipeline stages are
    refused.
    """

    def __init__(self, config, model_config: ModelConfig, options: ConceptOptions,
                 transformer_impl: str = "local", attention: str = "sdpa", **kwargs):
        if config.pipeline_model_parallel_size != 1 or not kwargs.get("pre_process", True) \
                or not kwargs.get("post_process", True):
            raise ConfigError(PIPELINE_REFUSAL)
        if config.recompute_granularity == "full":
            raise ConfigError("--method concepts drives its layers itself: use "
                              "--recompute-granularity selective, not full")
        tp = config.tensor_model_parallel_size
        if options.num_concepts % tp:
            raise ConfigError(f"--num-concepts {options.num_concepts} must be divisible by "
                              f"--tensor-model-parallel-size {tp}")
        self.insert_layer = options.resolved_insert_layer(config.num_layers)
        super().__init__(config, model_config, transformer_impl, attention, **kwargs)
        self.concept_options = options
        self.concepts = ConceptHead(config, options.num_concepts, options.top_k, self.tp_group)

    @property
    def interleaved(self) -> bool:
        return self.concept_options.mixing == "interleave"

    def set_steering(self, scales: dict[int, float]) -> None:
        """Scale the chosen predicted-concept logits before the top-k from now on (the
        paper's steering; empty: none). Ids outside [0, C) are refused."""
        for concept in scales:
            if not 0 <= int(concept) < self.concept_options.num_concepts:
                raise ConfigError(f"concept {concept} is not one of this model's "
                                  f"{self.concept_options.num_concepts} concepts (0.."
                                  f"{self.concept_options.num_concepts - 1})")
        self.concepts.steering = {int(k): float(v) for k, v in scales.items()}

    def make_inference_context(self, max_batch_size: int,
                               max_sequence_length: int) -> ConceptInferenceContext:
        return ConceptInferenceContext(max_batch_size, max_sequence_length, self.interleaved)

    # -- rotary tables -----------------------------------------------------------------
    def _rotary(self, length: int, device: torch.device, position_ids: Tensor | None,
                upper: bool) -> Tensor:
        """Rotary frequencies for `length` token positions (the lower blocks), or for the
        upper blocks' slots: 2 per token when interleaved."""
        if not (upper and self.interleaved):
            if position_ids is not None:
                return self.rotary_pos_emb.for_positions(position_ids.to(device))
            return self.rotary_pos_emb(length, device=device)
        if self.concept_options.positions == "sequential":
            if position_ids is not None:
                pairs = 2 * position_ids.to(device)
                slots = torch.stack([pairs, pairs + 1], dim=-1).flatten(1)
                return self.rotary_pos_emb.for_positions(slots)
            return self.rotary_pos_emb(2 * length, device=device)
        if position_ids is not None:
            return self.rotary_pos_emb.for_positions(
                position_ids.to(device).repeat_interleave(2, dim=1))
        return self.rotary_pos_emb(length, device=device).repeat_interleave(2, dim=0)

    # -- forward -----------------------------------------------------------------------
    def _contexts(self, inference_context) -> tuple:
        if inference_context is None:
            return None, None
        if not isinstance(inference_context, ConceptInferenceContext):
            raise ValueError("a concept model needs its own KV caches: build the context with "
                             "model.make_inference_context(max_batch_size, max_sequence_length)")
        return inference_context.lower, inference_context.upper

    def concept_forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                        inference_context=None) -> tuple[Tensor, Tensor]:
        """(final hidden of the output slots [s(/tp), b, d], concept logits z [s, b, C/tp])."""
        lower_ctx, upper_ctx = self._contexts(inference_context)
        seq_length = input_ids.shape[1]
        rotary_len = seq_length if inference_context is None else \
            inference_context.max_sequence_length
        hidden = self.embed(input_ids)
        device = hidden.device
        lower_rotary = self._rotary(rotary_len, device, position_ids, upper=False)
        layers = self.decoder.layers
        for layer in layers[:self.insert_layer]:
            hidden, _ = layer(hidden_states=hidden, attention_mask=None,
                              rotary_pos_emb=lower_rotary, inference_context=lower_ctx)
        x, mu, sigma = concept_norm(hidden)
        z = self.concepts.logits(x)
        c_hat = self.concepts.continuous(z, mu, sigma).to(hidden.dtype)
        if self.interleaved:
            hidden = interleave(hidden, c_hat)
            upper_rotary = self._rotary(rotary_len, device, position_ids, upper=True)
        else:
            hidden = hidden + c_hat
            upper_rotary = lower_rotary
        upper_layers = layers[self.insert_layer:]
        if upper_ctx is not None and upper_ctx.sequence_len_offset > 0 and hidden.shape[0] > 1:
            hidden = self._decode_slots(upper_layers, hidden, upper_rotary, upper_ctx)
        else:
            for layer in upper_layers:
                hidden, _ = layer(hidden_states=hidden, attention_mask=None,
                                  rotary_pos_emb=upper_rotary, inference_context=upper_ctx)
        if self.interleaved:
            hidden = hidden[1::2]
        return self.decoder.final_layernorm(hidden), z

    @staticmethod
    def _decode_slots(layers, hidden: Tensor, rotary: Tensor, context) -> Tensor:
        """Several new slots after the prompt (h_t, ĉ_t of a decoded token): megatron-core
        drops the causal mask once a static cache holds a prompt, so each slot runs the upper
        blocks alone, at its own cache offset, and sees only the slots before it."""
        start = context.sequence_len_offset
        outputs = []
        try:
            for slot in range(hidden.shape[0]):
                x = hidden[slot:slot + 1]
                for layer in layers:
                    x, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary,
                                 inference_context=context)
                outputs.append(x)
                context.sequence_len_offset += 1
        finally:
            context.sequence_len_offset = start  # the driver advances the caches itself
        return torch.cat(outputs)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None,
                decoder_input: Tensor | None = None, inference_context=None,
                concept_ids: Tensor | None = None, concept_weights: Tensor | None = None,
                ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Logits [b, s, V/tp] without labels; with labels the per-token LM loss [b, s] and,
        given the teacher's `concept_ids` [b, s, K] (and `concept_weights` [b, s, K], 0 = no
        loss), aux {"scaled_concept_loss": λ × concept loss, "concept_ce": concept loss}: the
        concept loss is Σ w_tk · CE(z_t, id_tk) / Σ w_tk over this micro-batch's tokens t and
        labels k: with every weight 1 the mean over tokens of the mean over the K labels (the
        unshifted target: z_t predicts position t's own concepts)."""
        if decoder_input is not None:
            raise ValueError("the concept model embeds its own tokens; decoder_input is not used")
        if attention_mask is not None:
            raise ConfigError("--method concepts does not support --reset-attention-mask")
        labeler = getattr(self, "online_labeler", None)
        if labels is not None and concept_ids is None and labeler is not None \
                and torch.is_grad_enabled():  # online labels (training steps only)
            online = labeler(input_ids)
            concept_ids, concept_weights = online.ids, online.weights
        hidden, z = self.concept_forward(input_ids, position_ids, inference_context)
        output = self.logits_or_loss(self.output_logits(hidden), labels)
        if labels is None or concept_ids is None:
            return output
        per_label = self.concepts.loss(z, concept_ids.transpose(0, 1))  # [s, b, K]
        if concept_weights is None:
            weights = torch.ones_like(per_label)
        else:
            weights = concept_weights.transpose(0, 1).float()
        ce = (per_label * weights).sum() / weights.sum().clamp(min=1.0)
        return output, {SCALED_LOSS_KEY: self.concept_options.loss_weight * ce,
                        CONCEPT_CE_KEY: ce.detach()}


__all__ = ["CONCEPT_CE_KEY", "ConceptInferenceContext", "ConceptModel", "SCALED_LOSS_KEY",
           "interleave"]
