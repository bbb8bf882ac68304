"""Weight and config mapping between PythiaModel and Hugging Face GPTNeoX (any TP size).

Megatron's fused QKV and GPT-NeoX's `query_key_value` share one layout (per head: q, k, v),
so the mapping is a renaming plus tensor-parallel slicing: column-parallel weights (QKV, fc1,
embeddings, head) split on the output dim, row-parallel weights (dense, fc2) on the input dim.
State dicts use this project's canonical names (the local spec's); `canonical_state_dict`
turns a transformer-engine model's names into them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig

_LAYER = r"decoder\.layers\.(\d+)\."

#: canonical (megatron) name pattern -> Hugging Face name template
_TO_HF: list[tuple[str, str]] = [
    (r"embedding\.word_embeddings\.weight", "gpt_neox.embed_in.weight"),
    (_LAYER + r"input_layernorm\.(weight|bias)", "gpt_neox.layers.{0}.input_layernorm.{1}"),
    (_LAYER + r"pre_mlp_layernorm\.(weight|bias)",
     "gpt_neox.layers.{0}.post_attention_layernorm.{1}"),
    (_LAYER + r"self_attention\.linear_qkv\.(weight|bias)",
     "gpt_neox.layers.{0}.attention.query_key_value.{1}"),
    (_LAYER + r"self_attention\.linear_proj\.(weight|bias)",
     "gpt_neox.layers.{0}.attention.dense.{1}"),
    (_LAYER + r"mlp\.linear_fc1\.(weight|bias)", "gpt_neox.layers.{0}.mlp.dense_h_to_4h.{1}"),
    (_LAYER + r"mlp\.linear_fc2\.(weight|bias)", "gpt_neox.layers.{0}.mlp.dense_4h_to_h.{1}"),
    (r"decoder\.final_layernorm\.(weight|bias)", "gpt_neox.final_layer_norm.{0}"),
    (r"output_layer\.weight", "embed_out.weight"),
]
_FROM_HF: list[tuple[str, str]] = [
    (r"gpt_neox\.embed_in\.weight", "embedding.word_embeddings.weight"),
    (r"gpt_neox\.layers\.(\d+)\.input_layernorm\.(weight|bias)",
     "decoder.layers.{0}.input_layernorm.{1}"),
    (r"gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)",
     "decoder.layers.{0}.pre_mlp_layernorm.{1}"),
    (r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)",
     "decoder.layers.{0}.self_attention.linear_qkv.{1}"),
    (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.(weight|bias)",
     "decoder.layers.{0}.self_attention.linear_proj.{1}"),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)",
     "decoder.layers.{0}.mlp.linear_fc1.{1}"),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)",
     "decoder.layers.{0}.mlp.linear_fc2.{1}"),
    (r"gpt_neox\.final_layer_norm\.(weight|bias)", "decoder.final_layernorm.{0}"),
    (r"(?:embed_out|lm_head)\.weight", "output_layer.weight"),
]
#: Hugging Face buffers that carry no learned state.
_HF_BUFFERS = re.compile(r".*\.(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")

#: transformer-engine spec names -> canonical names.
_TE_TO_CANONICAL = [
    (r"(" + _LAYER + r")self_attention\.linear_qkv\.layer_norm_(weight|bias)",
     "{0}input_layernorm.{2}"),
    (r"(" + _LAYER + r")mlp\.linear_fc1\.layer_norm_(weight|bias)", "{0}pre_mlp_layernorm.{2}"),
]


def _rename(name: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, template in table:
        match = re.fullmatch(pattern, name)
        if match:
            return template.format(*match.groups())
    return None


def canonical_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Model state dict with transformer-engine names mapped to canonical ones and TE's
    `_extra_state` entries (FP8 metadata) dropped."""
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("_extra_state") or tensor is None:
            continue
        out[_rename(name, _TE_TO_CANONICAL) or name] = tensor
    return out


#: (regex, dim) of parameters that methods add and shard over TP (register_tp_split).
_METHOD_SPLITS: list[tuple[re.Pattern, int]] = []


def register_tp_split(pattern: str, dim: int) -> None:
    """Declare that a method's parameters matching `pattern` (a regex searched in the
    canonical name) are sharded along `dim` across TP ranks."""
    _METHOD_SPLITS.append((re.compile(pattern), dim))


def tp_split_dim(name: str) -> int | None:
    """Dimension along which a canonical parameter is sharded across TP ranks (None = replicated)."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return 0
    from ..methods.registry import available_methods

    available_methods()  # the methods' packages register their splits when imported
    for pattern, dim in _METHOD_SPLITS:
        if pattern.search(name):
            return dim
    if re.search(r"(linear_qkv|linear_q|linear_kv|linear_fc1)\.(weight|bias)$", name):
        return 0
    if re.search(r"(linear_proj|linear_fc2)\.weight$", name):
        return 1
    return None


def canonical_shapes(config: ModelConfig, padded_vocab_size: int | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """Unsharded shape of every canonical weight of a Pythia model (vocab padded for TP=1
    unless given)."""
    h, f = config.hidden_size, config.ffn_hidden_size
    v = padded_vocab_size or config.padded_vocab_size()
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (v, h)}
    for layer in range(config.num_layers):
        prefix = f"decoder.layers.{layer}."
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            shapes[prefix + norm + ".weight"] = (h,)
            shapes[prefix + norm + ".bias"] = (h,)
        shapes.update({
            prefix + "self_attention.linear_qkv.weight": (3 * h, h),
            prefix + "self_attention.linear_qkv.bias": (3 * h,),
            prefix + "self_attention.linear_proj.weight": (h, h),
            prefix + "self_attention.linear_proj.bias": (h,),
            prefix + "mlp.linear_fc1.weight": (f, h),
            prefix + "mlp.linear_fc1.bias": (f,),
            prefix + "mlp.linear_fc2.weight": (h, f),
            prefix + "mlp.linear_fc2.bias": (h,),
        })
    shapes["decoder.final_layernorm.weight"] = (h,)
    shapes["decoder.final_layernorm.bias"] = (h,)
    shapes["output_layer.weight"] = (v, h)
    return shapes


VOCAB_ROW_WEIGHTS = ("embedding.word_embeddings.weight", "output_layer.weight")


def resize_vocab_rows(full: Mapping[str, Tensor], rows: int) -> dict[str, Tensor]:
    """The vocabulary-row weights cut or zero-padded to `rows` (the padding to a multiple of
    make_vocab_size_divisible_by x TP depends on the TP size; real ids are never cut as long
    as `rows` is a padded size of the same vocabulary)."""
    out = dict(full)
    for name in VOCAB_ROW_WEIGHTS:
        tensor = out.get(name)
        if tensor is None or tensor.shape[0] == rows:
            continue
        if tensor.shape[0] > rows:
            out[name] = tensor[:rows]
        else:
            out[name] = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0],
                                                            *tensor.shape[1:])])
    return out


def shard_for_rank(full: Mapping[str, Tensor], tp_size: int, tp_rank: int,
                   vocab_rows: int | None = None) -> dict[str, Tensor]:
    """Slice an unsharded canonical state dict down to one TP rank's shard (with
    `vocab_rows`, the vocabulary rows first fitted to that padded size)."""
    if vocab_rows is not None:
        full = resize_vocab_rows(full, vocab_rows)
    out = {}
    for name, tensor in full.items():
        dim = tp_split_dim(name)
        if dim is None or tp_size == 1:
            out[name] = tensor.clone()
        else:
            if tensor.shape[dim] % tp_size:
                raise ConfigError(f"{name} dim {dim} ({tensor.shape[dim]}) not divisible by TP {tp_size}")
            out[name] = tensor.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def merge_shards(shards: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-TP-rank canonical state dicts (rank order) into the unsharded one."""
    out = {}
    for name in shards[0]:
        dim = tp_split_dim(name)
        if dim is None or len(shards) == 1:
            out[name] = shards[0][name].clone()
        else:
            out[name] = torch.cat([shard[name] for shard in shards], dim=dim)
    return out


def hf_config_to_model_config(hf: Mapping) -> ModelConfig:
    """ModelConfig from a GPTNeoX `config.json` dict; refuses variants this model is not."""
    if hf.get("model_type", "gpt_neox") != "gpt_neox":
        raise ConfigError(f"expected a gpt_neox config, got model_type={hf.get('model_type')!r}")
    if not hf.get("use_parallel_residual", True):
        raise ConfigError("only use_parallel_residual=true (Pythia) is supported")
    if hf.get("tie_word_embeddings", False):
        raise ConfigError("tied input/output embeddings are not supported (Pythia unties them)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"hidden_act must be 'gelu', got {hf.get('hidden_act')!r}")
    rope_theta = hf.get("rotary_emb_base", None)
    if rope_theta is None:
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000)
    rotary_pct = hf.get("rotary_pct", None)
    if rotary_pct is None:
        rotary_pct = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 0.25)
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        ffn_hidden_size=hf.get("intermediate_size", 4 * hf["hidden_size"]),
        seq_length=hf.get("max_position_embeddings", 2048),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        rotary_percent=float(rotary_pct),
        rotary_base=int(rope_theta),
        layernorm_epsilon=hf.get("layer_norm_eps", 1e-5),
        hidden_dropout=hf.get("hidden_dropout", 0.0),
        attention_dropout=hf.get("attention_dropout", 0.0),
    )


def model_config_to_hf_config(
    config: ModelConfig,
    vocab_size: int | None = None,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """GPTNeoX `config.json` dict for a ModelConfig (vocab defaults to the padded size).

    The special-token ids are the tokenizer's (EOS = its end-of-document id); None (unknown)
    is written as null rather than GPTNeoXConfig's defaults, which name other tokens.
    """
    rows = vocab_size or config.padded_vocab_size()
    for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                        ("pad_token_id", pad_token_id)):
        if value is not None and not 0 <= value < rows:
            raise ConfigError(f"{name} {value} is outside the vocabulary of {rows} ids")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": rows,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.ffn_hidden_size,
        "hidden_act": "gelu",
        "rotary_pct": config.rotary_percent,
        "rotary_emb_base": config.rotary_base,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.small_init_std,
        "layer_norm_eps": config.layernorm_epsilon,
        "use_cache": True,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "attention_dropout": config.attention_dropout,
        "hidden_dropout": config.hidden_dropout,
        "attention_bias": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": "float32",
    }


def hf_to_canonical(hf_state_dict: Mapping[str, Tensor], padded_vocab_size: int) -> dict[str, Tensor]:
    """Unsharded canonical state dict from a GPTNeoX state dict.

    Vocabulary rows beyond the Hugging Face vocab (padding to the TP-friendly size) are zero.
    """
    out = {}
    for name, tensor in hf_state_dict.items():
        if _HF_BUFFERS.match(name):
            continue
        target = _rename(name, _FROM_HF)
        if target is None:
            raise ConfigError(f"unexpected Hugging Face GPTNeoX weight {name!r}")
        if target in ("embedding.word_embeddings.weight", "output_layer.weight"):
            rows = tensor.shape[0]
            if rows > padded_vocab_size:
                raise ConfigError(
                    f"{name} has {rows} vocabulary rows, more than the model's {padded_vocab_size}"
                )
            if rows < padded_vocab_size:
                pad = tensor.new_zeros(padded_vocab_size - rows, tensor.shape[1])
                tensor = torch.cat([tensor, pad], dim=0)
        out[target] = tensor.detach().clone()
    return out


def canonical_to_hf(
    state_dict: Mapping[str, Tensor],
    vocab_size: int | None = None,
    head_name: str = "embed_out.weight",
) -> dict[str, Tensor]:
    """GPTNeoX state dict from an unsharded canonical one (vocab rows cut to `vocab_size`).

    The head is named as in the published Pythia checkpoints (`embed_out.weight`);
    transformers >= 5 calls it `lm_head.weight` in memory and maps the file name on load.
    """
    out = {}
    for name, tensor in canonical_state_dict(state_dict).items():
        target = _rename(name, _TO_HF)
        if target is None:
            raise ConfigError(f"no Hugging Face GPTNeoX name for weight {name!r}")
        if target == "embed_out.weight":
            target = head_name
        if vocab_size is not None and target in ("gpt_neox.embed_in.weight", head_name):
            tensor = tensor[:vocab_size]
        out[target] = tensor.detach().clone()
    return out


def _layer_offset(model: torch.nn.Module) -> int:
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return layers[0].layer_number - 1


def _shift_layer(name: str, offset: int) -> str:
    if not offset:
        return name
    return re.sub(r"^decoder\.layers\.(\d+)\.",
                  lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


def model_to_canonical(model: torch.nn.Module) -> dict[str, Tensor]:
    """This rank's shard of the model as a canonical state dict (global layer numbers)."""
    offset = _layer_offset(model)
    return {
        _shift_layer(name, offset): tensor.detach()
        for name, tensor in canonical_state_dict(model.state_dict()).items()
    }


def load_canonical(model: torch.nn.Module, shard: Mapping[str, Tensor]) -> None:
    """Copy a canonical (this rank's TP shard, global layer numbers) state dict into a model
    of either spec family; every model weight must be present with its exact shape."""
    offset = _layer_offset(model)
    own = model.state_dict()
    missing, mismatched = [], []
    for name, target in own.items():
        if name.endswith("_extra_state"):
            continue
        key = _shift_layer(_rename(name, _TE_TO_CANONICAL) or name, offset)
        if key not in shard:
            missing.append(key)
            continue
        if tuple(shard[key].shape) != tuple(target.shape):
            mismatched.append(f"{key}: {tuple(shard[key].shape)} vs model {tuple(target.shape)}")
            continue
        with torch.no_grad():
            target.copy_(shard[key])
    if missing or mismatched:
        raise ConfigError(
            "state dict does not fit the model; "
            + (f"missing: {missing[:5]}" if missing else "")
            + (f" shape mismatch: {mismatched[:5]}" if mismatched else "")
        )
