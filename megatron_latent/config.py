"""Configuration dataclasses: model shape, parallel layout, and the Pythia presets.

A preset holds the published shape and training recipe of one Pythia model; `ModelConfig`
is the architecture alone. `validate()` rejects impossible shapes before anything is
allocated, so a bad flag never costs a model build.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

AttentionBackend = Literal["auto", "sdpa", "local", "te"]

#: Vocabulary of the GPT-NeoX-20B tokenizer that Pythia uses (before padding).
PYTHIA_VOCAB_SIZE = 50277


class ConfigError(ValueError):
    """A configuration that cannot be built; the message names the offending value."""


@dataclass
class ModelConfig:
    """Shape of a Pythia (GPT-NeoX) decoder; every field maps to one architecture choice."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int = 2048
    max_position_embeddings: int | None = None
    vocab_size: int = PYTHIA_VOCAB_SIZE
    make_vocab_size_divisible_by: int = 128
    ffn_hidden_size: int | None = None
    rotary_percent: float = 0.25
    rotary_base: int = 10000
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    #: Pythia's "small_init" std for linear layers; None means sqrt(2 / (5 * hidden)).
    init_method_std: float | None = None
    #: Depth used by "wang_init" of output projections (attention dense, MLP down):
    #: std = 2 / (init_depth * sqrt(hidden)); None means num_layers. Methods that unroll
    #: the stack (pondering) count the unrolled depth here.
    init_depth: int | None = None
    #: Explicit std for the output projections, overriding wang_init when set.
    output_init_std: float | None = None
    attention_backend: AttentionBackend = "auto"
    #: Ids a method adds right after the tokenizer's vocabulary (thought memory's PAD, BOS,
    #: EOS, EOD): inside the padded embedding, never sampled as text.
    extra_vocab: int = 0

    def __post_init__(self) -> None:
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    @property
    def small_init_std(self) -> float:
        if self.init_method_std is not None:
            return self.init_method_std
        return math.sqrt(2.0 / (5.0 * self.hidden_size))

    @property
    def wang_init_std(self) -> float:
        if self.output_init_std is not None:
            return self.output_init_std
        depth = self.init_depth if self.init_depth is not None else self.num_layers
        return 2.0 / (depth * math.sqrt(self.hidden_size))

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocabulary (with a method's `extra_vocab` ids) rounded up to a multiple of
        `make_vocab_size_divisible_by` x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil((self.vocab_size + self.extra_vocab) / multiple) * multiple)

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ConfigError naming the first impossible value; allocates nothing."""
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "vocab_size", "ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if tensor_parallel_size < 1:
            raise ConfigError(f"tensor parallel size must be >= 1, got {tensor_parallel_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % tensor_parallel_size:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by the "
                f"tensor parallel size {tensor_parallel_size}"
            )
        if self.ffn_hidden_size % tensor_parallel_size:
            raise ConfigError(
                f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by the tensor "
                f"parallel size {tensor_parallel_size}"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        exact_rotary = self.head_dim * self.rotary_percent
        if exact_rotary != int(exact_rotary) or self.rotary_dim % 2:
            raise ConfigError(
                f"rotary_percent {self.rotary_percent} of head dim {self.head_dim} gives a "
                f"rotary dim of {exact_rotary:g}; it must be a whole even number"
            )
        if self.max_position_embeddings < self.seq_length:
            raise ConfigError(
                f"seq_length {self.seq_length} exceeds max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.attention_backend not in ("auto", "sdpa", "local", "te"):
            raise ConfigError(
                f"attention_backend must be one of auto, sdpa, local, te; got "
                f"{self.attention_backend!r}"
            )

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainingRecipe:
    """The optimisation hyperparameters a preset was published with."""

    lr: float
    min_lr: float
    micro_batch_size: int
    global_batch_size: int = 1024
    train_iters: int = 143_000
    lr_warmup_fraction: float = 0.01
    lr_decay_style: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    tensor_model_parallel_size: int = 1


@dataclass(frozen=True)
class Preset:
    """A named model: its shape and the recipe it was trained with."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    recipe: TrainingRecipe
    #: Published total parameter count, where one exists (vocab padded to 128 x the
    #: preset's TP size: 50304, or 50432 / 50688 for the 6.9b / 12b models).
    published_params: int | None = None
    published_non_embedding_params: int | None = None
    seq_length: int = 2048
    vocab_size: int = PYTHIA_VOCAB_SIZE
    extra: dict = field(default_factory=dict)

    def model_config(self, **overrides) -> ModelConfig:
        values = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            seq_length=self.seq_length,
            vocab_size=self.vocab_size,
        )
        values.update(self.extra)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return ModelConfig(**values)


def _pythia(name, layers, hidden, heads, lr, micro, params=None, non_embedding=None, tp=1):
    recipe = TrainingRecipe(lr=lr, min_lr=lr / 10, micro_batch_size=micro,
                            tensor_model_parallel_size=tp)
    return Preset(name, layers, hidden, heads, recipe, params, non_embedding)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _pythia("pythia-14m", 6, 128, 4, 1e-3, 32),
        _pythia("pythia-31m", 6, 256, 8, 1e-3, 32),
        _pythia("pythia-70m", 6, 512, 8, 1e-3, 32, 70_426_624, 18_915_328),
        _pythia("pythia-160m", 12, 768, 12, 6e-4, 32, 162_322_944, 85_056_000),
        _pythia("pythia-410m", 24, 1024, 16, 3e-4, 32, 405_334_016, 302_311_424),
        _pythia("pythia-1b", 16, 2048, 8, 2.5e-4, 16, 1_011_781_632, 805_736_448),
        _pythia("pythia-1.4b", 24, 2048, 16, 2e-4, 16, 1_414_647_808, 1_208_602_624),
        _pythia("pythia-2.8b", 32, 2560, 32, 1.6e-4, 16, 2_775_208_960, 2_517_652_480),
        _pythia("pythia-6.9b", 32, 4096, 32, 1.2e-4, 8, 6_857_302_016, 6_444_163_072, tp=2),
        _pythia("pythia-12b", 36, 5120, 40, 1.2e-4, 8, 11_846_072_320, 11_327_027_200, tp=4),
        # A shape for tests and the CPU demo: 2 layers, hidden 64, 4 heads (head dim 16,
        # rotary dim 4), a 4k-token vocabulary and short sequences.
        Preset(
            "tiny", 2, 64, 4,
            TrainingRecipe(lr=3e-3, min_lr=3e-4, micro_batch_size=8, global_batch_size=16,
                           train_iters=200, weight_decay=0.01),
            seq_length=128, vocab_size=4096,
        ),
    ]
}

#: Short aliases: "1b" for "pythia-1b", and so on.
_ALIASES = {name.removeprefix("pythia-"): name for name in PRESETS}


def get_preset(name: str) -> Preset:
    """Look a preset up by name ("pythia-1b", "1b", "tiny"); unknown names list the known ones."""
    key = _ALIASES.get(name, name)
    if key not in PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}"
        )
    return PRESETS[key]


def count_parameters(config: ModelConfig, tensor_parallel_size: int = 1) -> dict[str, int]:
    """Parameter count of the whole (unsharded) model, from the shape alone.

    Per layer 12h^2 + 13h (QKV, dense, 4h MLP, two LayerNorms, all with biases), a final
    LayerNorm, and untied input/output embeddings over the padded vocabulary.
    """
    h, f = config.hidden_size, config.ffn_hidden_size
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (2 * h * f + f + h) + 4 * h
    non_embedding = config.num_layers * per_layer + 2 * h
    vocab = config.padded_vocab_size(tensor_parallel_size)
    embedding = 2 * vocab * h
    return {
        "total": non_embedding + embedding,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "padded_vocab_size": vocab,
    }
