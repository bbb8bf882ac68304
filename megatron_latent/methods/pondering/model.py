"""The pondering model: the Pythia stack run k + 1 times per forward, each pass after the first
fed E_{s-1} + softmax(logits_s) · W_in (see the package docstring)."""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from torch import Tensor

from ...config import ConfigError, ModelConfig
from ...models.language_model import PythiaModel, RuntimeOptions, build_pythia_model
from .inference import PonderingInferenceContext
from .mixing import mix_input_embeddings
from .options import PIPELINE_REFUSAL, PonderingOptions, prepare_pondering_config


class PonderingPythiaModel(PythiaModel):
    """The Pythia model run k + 1 times per forward with pondering embeddings fed back.

    Same parameters (and checkpoint names) as PythiaModel; only the forward differs.
    """

    def __init__(self, config, model_config: ModelConfig, options: PonderingOptions,
                 transformer_impl: str = "local", attention: str = "sdpa", **kwargs):
        if not kwargs.get("pre_process", True) or not kwargs.get("post_process", True):
            raise ConfigError(PIPELINE_REFUSAL)
        if config.pipeline_model_parallel_size != 1:
            raise ConfigError(PIPELINE_REFUSAL)
        options.validate(model_config.vocab_size)
        super().__init__(config, model_config, transformer_impl, attention, **kwargs)
        self.pondering = options

    @property
    def num_passes(self) -> int:
        return self.pondering.passes

    def make_inference_context(self, max_batch_size: int,
                               max_sequence_length: int) -> PonderingInferenceContext:
        """KV caches for generation: one per pass."""
        return PonderingInferenceContext(self.num_passes, max_batch_size, max_sequence_length)

    def _pass_contexts(self, inference_context) -> list:
        if inference_context is None:
            return [None] * self.num_passes
        if not isinstance(inference_context, PonderingInferenceContext) or len(
                inference_context.passes) != self.num_passes:
            raise ValueError(
                "a pondering model needs one KV cache per pass: build the context with "
                "model.make_inference_context(max_batch_size, max_sequence_length)"
            )
        return inference_context.passes

    def ponder_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      inference_context: PonderingInferenceContext | None = None,
                      position_ids: Tensor | None = None) -> Tensor:
        """Run all k + 1 passes; the final pass's logits [s, b, V/tp]."""
        options = self.pondering
        contexts = self._pass_contexts(inference_context)
        seq_length = input_ids.shape[1]
        embeds = self.embed(input_ids)
        scale = math.sqrt(self.config.hidden_size) if options.scale_embeds else 1.0
        if options.scale_embeds:
            embeds = embeds * scale
        if options.multiply_steps:
            embeds = embeds * options.steps
        table = self.input_embedding_weight()
        for step in range(options.steps):
            hidden = self.run_decoder(embeds, seq_length, attention_mask, contexts[step],
                                      position_ids)
            logits = self.output_logits(hidden)
            mixed = mix_input_embeddings(
                logits, table, options.top_k, self.config.sequence_parallel, self.tp_group
            )
            # P · (sqrt(h) W_in) computed as sqrt(h) (P · W_in): a [s, b, h] scale, not [V, h].
            embeds = embeds + (mixed * scale if options.scale_embeds else mixed)
        hidden = self.run_decoder(embeds, seq_length, attention_mask, contexts[-1], position_ids)
        return self.output_logits(hidden)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input: Tensor | None = None,
        inference_context: PonderingInferenceContext | None = None,
    ) -> Tensor:
        """Final-pass logits [b, s, V/tp] without labels; per-token loss [b, s] with labels
        (cross-entropy on the final pass only)."""
        if decoder_input is not None:
            raise ValueError("the pondering model embeds its own tokens; decoder_input is not used")
        logits = self.ponder_logits(input_ids, attention_mask, inference_context, position_ids)
        return self.logits_or_loss(logits, labels)


def build_pondering_model(
    model_config: ModelConfig,
    runtime: RuntimeOptions | None = None,
    device: torch.device | str = "cpu",
    options: PonderingOptions | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> PonderingPythiaModel:
    """Build a PonderingPythiaModel (megatron-core parallel state must be initialised)."""
    options = options or PonderingOptions()
    runtime = runtime or RuntimeOptions(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size()
    )
    if runtime.pipeline_model_parallel_size != 1 or not (pre_process and post_process):
        raise ConfigError(PIPELINE_REFUSAL)
    model_config = prepare_pondering_config(model_config, options)
    return build_pythia_model(model_config, runtime, device,
                              model_class=PonderingPythiaModel, options=options)
