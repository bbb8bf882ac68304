"""Device-agnostic pieces that fill megatron-core's slots for the Pythia layer.

megatron-core's own DotProductAttention, RotaryEmbedding and torch-backed norm assume CUDA
(global memory buffer, a forced device move) or refuse sequence parallelism. The classes here
take the same constructor arguments in the same spec slots and run on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from megatron.core.utils import make_viewless_tensor
from torch import Tensor


class RotaryEmbedding(torch.nn.Module):
    """Rotary frequencies for the first `rotary_percent` of each head (GPT-NeoX rotate-half).

    Returns megatron-core's layout, [seq, 1, 1, rotary_dim] with the frequencies repeated
    twice, so megatron's `apply_rotary_pos_emb` rotates the leading dims of q and k. The
    inverse frequencies are not a module buffer: casting the model to bf16 (Float16Module)
    must not round them, so they are always computed in fp32 on the caller's device.
    """

    def __init__(self, kv_channels: int, rotary_percent: float, rotary_base: int = 10000):
        super().__init__()
        self.dim = int(kv_channels * rotary_percent)
        self.base = rotary_base
        self._inv_freq: dict[torch.device, Tensor] = {}

    def inv_freq(self, device: torch.device) -> Tensor:
        if device not in self._inv_freq:
            exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
            self._inv_freq[device] = 1.0 / (self.base ** exponents)
        return self._inv_freq[device]

    def forward(self, seq_len: int, offset: int = 0,
                device: torch.device | str = "cpu") -> Tensor:
        inv_freq = self.inv_freq(torch.device(device))
        positions = torch.arange(offset, offset + seq_len, device=inv_freq.device,
                                 dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    def for_positions(self, position_ids: Tensor) -> Tensor:
        """Frequencies for explicit positions [b, s] (documents packed into one sequence with
        positions restarting at each document, `--reset-position-ids`): [s, b, 1, dim]."""
        inv_freq = self.inv_freq(position_ids.device)
        freqs = position_ids.t().to(torch.float32)[..., None] * inv_freq
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]


class LayerNorm(torch.nn.LayerNorm):
    """LayerNorm with bias whose parameters know when they live in a sequence-parallel region.

    Under sequence parallelism each TP rank normalises a different slice of the sequence, so
    the gradients of these (replicated) parameters must be summed across the TP group; the
    `sequence_parallel` attribute is how megatron-core (and this project's CPU engine) find them.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


class SDPACoreAttention(MegatronModule):
    """Core attention via torch's scaled_dot_product_attention (any device, any dtype).

    Takes megatron's [s, b, heads, head_dim] query/key/value and returns [s, b, heads*head_dim],
    as DotProductAttention does. Causal masking is offset so that a query block at the end of
    a longer key block (KV-cached decoding) sees every earlier key.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPA core attention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by SDPA core attention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, heads, dim = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if k.shape[1] != heads:  # grouped-query attention
            repeat = heads // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        mask = None
        is_causal = False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        if mask_type == AttnMaskType.causal and attention_mask is None and sq > 1:
            if sq == sk and mask is None:
                is_causal = True
            else:
                causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
                if mask is None:
                    mask = causal
                elif mask.dtype == torch.bool:
                    mask = mask & causal
                else:
                    mask = mask.masked_fill(~causal, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
        )
        # [b, heads, sq, dim] -> [sq, b, heads * dim]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


class PythiaSelfAttention(SelfAttention):
    """megatron-core SelfAttention whose static KV cache lives on the model's own device."""

    def _allocate_memory(self, inference_max_sequence_length, batch_size, dim, dtype):
        return torch.empty(
            inference_max_sequence_length,
            batch_size,
            self.num_query_groups_per_partition,
            dim,
            dtype=dtype,
            device=self.linear_proj.weight.device,
        )


@dataclass
class ParallelResidualLayerSubmodules:
    """Slots of a GPT-NeoX layer: two norms reading the same input, attention and MLP."""

    input_layernorm: ModuleSpec | type | None = None
    self_attention: ModuleSpec | type | None = None
    pre_mlp_layernorm: ModuleSpec | type | None = None
    mlp: ModuleSpec | type | None = None


class ParallelResidualLayer(MegatronModule, BaseTransformerLayer):
    """GPT-NeoX "parallel residual" layer: x + attn(LN1(x)) + mlp(LN2(x)).

    megatron-core's TransformerLayer is sequential (x + attn, then + mlp); this layer keeps its
    call signature so TransformerBlock builds and drives it unchanged.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: ParallelResidualLayerSubmodules,
        layer_number: int = 1,
        hidden_dropout: float | None = None,
        pg_collection: Any = None,
        vp_stage: int | None = None,
        **_: Any,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number + self._layer_offset(config, pg_collection, vp_stage)
        self.hidden_dropout = config.hidden_dropout if hidden_dropout is None else hidden_dropout
        attention_kwargs = {"layer_number": self.layer_number}
        mlp_kwargs = {}
        if pg_collection is not None:
            attention_kwargs["pg_collection"] = pg_collection
            mlp_kwargs["tp_group"] = pg_collection.tp
        self.input_layernorm = build_module(
            submodules.input_layernorm, config=config, hidden_size=config.hidden_size,
            eps=config.layernorm_epsilon,
        )
        self.self_attention = build_module(
            submodules.self_attention, config=config, **attention_kwargs
        )
        self.pre_mlp_layernorm = build_module(
            submodules.pre_mlp_layernorm, config=config, hidden_size=config.hidden_size,
            eps=config.layernorm_epsilon,
        )
        self.mlp = build_module(
            submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size, **mlp_kwargs
        )

    @staticmethod
    def _layer_offset(config, pg_collection, vp_stage) -> int:
        if config.pipeline_model_parallel_size == 1:
            return 0
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
        from megatron.core.utils import get_pg_rank

        pp_group = getattr(pg_collection, "pp", None) if pg_collection is not None else None
        return get_transformer_layer_offset(config, vp_stage, get_pg_rank(pp_group))

    def _add_dropout(self, out: Tensor, bias: Tensor | None) -> Tensor:
        if bias is not None:
            out = out + bias
        if self.hidden_dropout > 0 and self.training:
            out = F.dropout(out, p=self.hidden_dropout)
        return out

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        rotary_pos_cos: Tensor | None = None,
        rotary_pos_sin: Tensor | None = None,
        rotary_pos_cos_sin: Tensor | None = None,
        attention_bias: Tensor | None = None,
        inference_context: Any = None,
        packed_seq_params: Any = None,
        sequence_len_offset: Any = None,
        **_: Any,
    ) -> tuple[Tensor, Tensor | None]:
        attn_out, attn_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
        )
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        output = (
            hidden_states
            + self._add_dropout(attn_out, attn_bias)
            + self._add_dropout(mlp_out, mlp_bias)
        )
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad,
                                      keep_graph=True)
        return output, context
