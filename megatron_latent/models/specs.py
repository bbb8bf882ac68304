"""ModuleSpecs for the Pythia (GPT-NeoX) decoder layer.

Two families fill the same ParallelResidualLayer slots:
- local: megatron-core's ColumnParallelLinear / RowParallelLinear / MLP / SelfAttention, this
  project's LayerNorm and SDPA core attention (any device), or megatron's DotProductAttention
  on CUDA;
- transformer_engine: TE's fused LayerNorm+linear for QKV and fc1 (so the separate norms become
  identities), TE's row-parallel linear and TE attention, used on CUDA when TE is importable.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from ..config import ConfigError, ModelConfig
from .layers import (
    LayerNorm,
    ParallelResidualLayer,
    ParallelResidualLayerSubmodules,
    PythiaSelfAttention,
    SDPACoreAttention,
)


def transformer_engine_available() -> bool:
    """True when megatron-core itself imported transformer-engine (its ``HAVE_TE``).

    An installed but broken transformer-engine (built for another torch or CUDA) is reported
    as absent, as megatron-core treats it, rather than crashing the build."""
    try:
        from megatron.core.extensions import transformer_engine as te_extension
    except Exception:  # noqa: BLE001 - any failure to import means: not usable here
        return False
    return bool(getattr(te_extension, "HAVE_TE", False))


DOCUMENT_MASK_UNDER_TE = (
    "--reset-attention-mask with --attention-backend te: transformer-engine's attention applies "
    "only the causal mask and would ignore the per-document one, so the run would optimise "
    "another objective than on the CPU engine; use --attention-backend auto (transformer-engine "
    "linears with SDPA attention), sdpa or local")


def resolve_backends(config: ModelConfig, device: torch.device,
                     document_mask: bool = False) -> tuple[str, str]:
    """Pick (transformer_impl, core attention) for a device: 'local'|'transformer_engine',
    'sdpa'|'local'|'te'. Explicit choices that cannot run on the device are refused.

    `document_mask` (--reset-attention-mask): the attention must apply an arbitrary mask.
    transformer-engine's core attention is built causal and ignores the mask it is given, so
    'auto' then keeps transformer-engine's linears with SDPA attention and 'te' is refused."""
    on_cuda = device.type == "cuda"
    use_te = on_cuda and transformer_engine_available()
    backend = config.attention_backend
    if backend == "auto":
        if use_te:
            return "transformer_engine", "sdpa" if document_mask else "te"
        return "local", "sdpa"
    if backend == "te" and document_mask:
        raise ConfigError(DOCUMENT_MASK_UNDER_TE)
    if backend == "te":
        if not use_te:
            raise ConfigError(
                "attention backend 'te' needs CUDA and transformer-engine "
                "(pip install '.[te]' or use the NGC container)"
            )
        return "transformer_engine", "te"
    if backend == "local" and not on_cuda:
        raise ConfigError(
            "attention backend 'local' (megatron-core DotProductAttention) needs CUDA; "
            "use 'sdpa' on the CPU"
        )
    return "local", backend


def _core_attention_class(attention: str) -> type:
    if attention == "sdpa":
        return SDPACoreAttention
    if attention == "local":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return DotProductAttention
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention


def layer_spec(transformer_impl: str = "local", attention: str = "sdpa") -> ModuleSpec:
    """Spec of one parallel-residual layer for the chosen implementation family."""
    core_attention = _core_attention_class(attention)
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        qkv, fc1, row, norm = (
            TELayerNormColumnParallelLinear, TELayerNormColumnParallelLinear,
            TERowParallelLinear, IdentityOp,
        )
    else:
        qkv, fc1, row, norm = ColumnParallelLinear, ColumnParallelLinear, RowParallelLinear, LayerNorm
    return ModuleSpec(
        module=ParallelResidualLayer,
        submodules=ParallelResidualLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=PythiaSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=None,
                    k_layernorm=None,
                ),
            ),
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=row)),
        ),
    )


def block_spec(num_layers: int, transformer_impl: str = "local",
               attention: str = "sdpa") -> TransformerBlockSubmodules:
    """Spec of the decoder stack: `num_layers` identical layers and a final LayerNorm."""
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = LayerNorm
    spec = layer_spec(transformer_impl, attention)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=final_norm)
