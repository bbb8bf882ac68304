"""The Pythia (GPT-NeoX) language model assembled from megatron-core parts.

`PythiaModel` subclasses megatron-core's LanguageModule and composes its
LanguageModelEmbedding (vocab-parallel), TransformerBlock (this project's parallel-residual
layer spec) and a column-parallel output head that is not tied to the input embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from ..config import ModelConfig
from .layers import RotaryEmbedding
from .specs import block_spec, resolve_backends


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model is run rather than what it is: precision, parallel layout, recompute."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    fp16: bool = False
    #: None | "full" | "selective" (megatron-core's recompute_granularity).
    recompute_granularity: str | None = None
    recompute_num_layers: int = 1
    #: Initialise full weights on the CPU from the default generator and shard them, so the
    #: same seed gives the same model at every TP size. Slower for very large models on GPU.
    use_cpu_initialization: bool = True
    #: False: allocate the weights without drawing them (they are about to be loaded).
    perform_initialization: bool = True
    #: The attention receives per-document masks (--reset-attention-mask), so its core
    #: attention must apply an arbitrary mask (see specs.resolve_backends).
    document_mask: bool = False
    #: CUDA fusions (see `gradient_accumulation_fusion_available`, `rope_fusion_available`).
    gradient_accumulation_fusion: bool = False
    apply_rope_fusion: bool = False


def gradient_accumulation_fusion_available() -> bool:
    """Whether megatron-core's linears can accumulate weight gradients straight into fp32
    main grads (apex's fused_weight_gradient_mlp_cuda; megatron-core refuses the flag
    without it)."""
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))


def rope_fusion_available() -> bool:
    """Whether megatron-core found transformer-engine's fused rotary kernel."""
    try:
        from megatron.core.models.common.embeddings import rope_utils
    except Exception:  # noqa: BLE001 - any import failure: not available
        return False
    return getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None


def _normal_init(std: float):
    def init(tensor: Tensor) -> Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def build_transformer_config(model: ModelConfig, runtime: RuntimeOptions) -> TransformerConfig:
    """megatron-core TransformerConfig for a Pythia shape; fusions that change numerics
    (tanh-approximate bias-GeLU) or need CUDA kernels are off."""
    model.validate(runtime.tensor_model_parallel_size)
    recompute = runtime.recompute_granularity
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.layernorm_epsilon,
        normalization="LayerNorm",
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=runtime.apply_rope_fusion,
        persist_layer_norm=False,
        gradient_accumulation_fusion=runtime.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=False,
        rotary_interleaved=False,
        init_method=_normal_init(model.small_init_std),
        output_layer_init_method=_normal_init(model.wang_init_std),
        init_method_std=model.small_init_std,
        tensor_model_parallel_size=runtime.tensor_model_parallel_size,
        pipeline_model_parallel_size=runtime.pipeline_model_parallel_size,
        sequence_parallel=runtime.sequence_parallel,
        params_dtype=runtime.params_dtype,
        bf16=runtime.bf16,
        fp16=runtime.fp16,
        use_cpu_initialization=runtime.use_cpu_initialization,
        perform_initialization=runtime.perform_initialization,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=runtime.recompute_num_layers if recompute == "full" else None,
        cuda_graph_scope=[],  # the whole layer (megatron-core's current spelling of "full")
        # Pipeline stages exchange activations in the parameter dtype; freeing a stage's
        # output once it is sent (only its shape is kept) is what Megatron-LM does too.
        pipeline_dtype=runtime.params_dtype,
        deallocate_pipeline_outputs=True,
    )


class PythiaModel(LanguageModule):
    """GPT-NeoX decoder: embedding -> parallel-residual layers -> final LN -> untied head.

    Logits stay sharded over the vocabulary on each TP rank ([b, s, V/tp]); the loss is
    megatron-core's vocab-parallel cross-entropy, so no rank materialises full-vocab logits.
    """

    def __init__(
        self,
        config: TransformerConfig,
        model_config: ModelConfig,
        transformer_impl: str = "local",
        attention: str = "sdpa",
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        # megatron-core's schedules ask every model chunk for its type (get_model_type).
        self.model_type = ModelType.encoder_or_decoder
        self.model_config = model_config
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = False
        self.vocab_size = model_config.padded_vocab_size(config.tensor_model_parallel_size)
        self.max_sequence_length = model_config.max_position_embeddings
        self.transformer_impl = transformer_impl
        self.attention_backend_name = attention

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=self.vocab_size,
                max_sequence_length=self.max_sequence_length,
                position_embedding_type="rope",
                tp_group=self.tp_group,
            )
        self.rotary_pos_emb = RotaryEmbedding(
            config.kv_channels, model_config.rotary_percent, model_config.rotary_base
        )
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        num_layers = get_num_layers_to_build(config, vp_stage, pp_rank)
        self.decoder = TransformerBlock(
            config=config,
            spec=block_spec(num_layers, transformer_impl, attention),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                self.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                tp_group=self.tp_group,
            )
        self.setup_embeddings_and_output_layer()

    # -- pipeline plumbing -------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous pipeline stage's activations (megatron-core schedules)."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # -- the three stages of a pass, exposed for methods that loop over them ------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids [b, s] -> input embeddings [s, b, h] ([s/tp, b, h] under sequence parallel)."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def input_embedding_weight(self) -> Tensor:
        """This rank's vocab shard of the input embedding table, [V/tp, h]."""
        return self.embedding.word_embeddings.weight

    def run_decoder(self, hidden_states: Tensor, seq_length: int,
                    attention_mask: Tensor | None = None, inference_context=None,
                    position_ids: Tensor | None = None) -> Tensor:
        """Run the layer stack (and final LN on the last stage) on [s(/tp), b, h] inputs.

        Rotary positions are 0..s-1 unless `position_ids` [b, s] gives them (training on
        packed documents whose positions restart at each document)."""
        if position_ids is not None and inference_context is not None:
            raise ValueError("position_ids are not supported with a KV cache")
        if inference_context is not None:
            rotary_len = inference_context.max_sequence_length
        else:
            rotary_len = seq_length
        device = (hidden_states.device if hidden_states is not None
                  else self.decoder.input_tensor.device)
        if position_ids is not None:
            rotary = self.rotary_pos_emb.for_positions(position_ids.to(device))
        else:
            rotary = self.rotary_pos_emb(rotary_len, device=device)
        return self.decoder(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary,
            inference_context=inference_context,
        )

    def output_logits(self, hidden_states: Tensor) -> Tensor:
        """Final hidden states -> this rank's vocab shard of the logits, [s, b, V/tp]."""
        logits, _ = self.output_layer(hidden_states)
        return logits

    # -- forward -----------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input: Tensor | None = None,
        inference_context=None,
    ) -> Tensor:
        """Logits [b, s, V/tp] without labels; per-token loss [b, s] with labels.

        On a pipeline stage that is not the last, returns the hidden states for the next.
        Rotary positions are `position_ids` [b, s] when given, else 0..s-1 (offset by the KV
        cache during generation).
        """
        seq_length = input_ids.shape[1] if input_ids is not None else None
        if decoder_input is not None:
            hidden = decoder_input
        elif self.pre_process:
            hidden = self.embed(input_ids)
        else:
            hidden = None  # the decoder reads the pipeline input tensor
        if seq_length is None:
            seq_length = hidden.shape[0] * (
                self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
            )
        hidden = self.run_decoder(hidden, seq_length, attention_mask, inference_context,
                                  position_ids)
        if not self.post_process:
            return hidden
        return self.logits_or_loss(self.output_logits(hidden), labels)

    def logits_or_loss(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        """[s, b, V/tp] logits -> [b, s, V/tp] logits, or the per-token loss [b, s]."""
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)


def build_pythia_model(
    model_config: ModelConfig,
    runtime: RuntimeOptions | None = None,
    device: torch.device | str = "cpu",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    model_class: type[PythiaModel] | None = None,
    **model_kwargs,
) -> PythiaModel:
    """Build a PythiaModel (or a method's subclass, given `model_class` and its extra
    keyword arguments) on `device`; megatron-core parallel state must be initialised."""
    runtime = runtime or RuntimeOptions(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size()
    )
    device = torch.device(device)
    transformer_impl, attention = resolve_backends(model_config, device, runtime.document_mask)
    config = build_transformer_config(model_config, runtime)
    model = (model_class or PythiaModel)(
        config, model_config, transformer_impl=transformer_impl, attention=attention,
        pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, **model_kwargs)
    return model.to(device)
