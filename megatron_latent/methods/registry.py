"""Training methods as plug-ins: each names a model builder, its own flags and its FLOPs.

The training loop only ever sees a `MethodSpec`; it never branches on which method runs.
A method's model takes `(input_ids, labels=...)` (or what its `model_inputs` hook builds from
its own micro-batches) and returns the per-token LM loss, or `(loss, aux)` where `aux` maps
names to auxiliary losses/metrics that the loop reduces and logs (a key ending in `_loss` is
added to the optimised loss as a per-micro-batch mean, one ending in `_loss_sum` as a sum
normalised like the LM loss).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, ModelConfig
from ..flops import forward_flops_per_token

#: builder(model_config, runtime_options, device, method_options, pre_process, post_process)
ModelBuilder = Callable[..., torch.nn.Module]


@dataclass
class MethodSpec:
    """Everything the trainer needs to know about one method."""

    name: str
    description: str
    build_model: ModelBuilder
    #: Add the method's flags to an argparse group (may be a no-op).
    add_arguments: Callable[[argparse._ArgumentGroup], None] = lambda group: None
    #: Method options (a dataclass) from parsed flags.
    options_from_args: Callable[[argparse.Namespace], Any] = lambda args: None
    #: Forward FLOPs per token of everything the method executes for one training sample.
    forward_flops_per_token: Callable[[ModelConfig, Any, int, int], float] = (
        lambda config, options, seq_length, tp: forward_flops_per_token(
            config, seq_length, tp).forward
    )
    #: Adjust the architecture for the method (e.g. the output-projection init of a model
    #: that unrolls its stack); called before the model is built.
    prepare_model_config: Callable[[ModelConfig, Any], ModelConfig] = (
        lambda config, options: config
    )
    #: The method's own training and validation data (None: Megatron GPT datasets):
    #: build_data(run, tokenizer, options, consumed_samples, total_iters) -> MethodData
    #: (megatron_latent.training.data documents the protocol).
    build_data: Callable[..., Any] | None = None
    #: Refuse the run's data before any model is built (None: the GPT datasets' checks);
    #: check_data(run) raises ConfigError naming the path or flag.
    check_data: Callable[..., None] | None = None
    #: Model keyword arguments from one of the method's micro-batches on `device` (None: the
    #: GPT batch's tokens/labels, with the data flags' mask and positions).
    model_inputs: Callable[[dict, torch.device], dict] | None = None
    #: Text generation for a model the token-by-token driver cannot step:
    #: generate_text(model, tokenizer, prompts: list[str], config: GenerationConfig,
    #: use_cache: bool) -> list[Generation]. None: megatron_latent.inference.generation.
    generate_text: Callable[..., Any] | None = None
    #: lm-eval log-likelihoods for a model that is not scored as one token sequence:
    #: score_continuations(model, tokenizer, pairs: list[tuple[str, str]], batch_size=8,
    #: language="en", split_on_newlines=False) -> list[tuple[float, bool]] (Σ log p of each
    #: continuation's tokens, whether every one is the argmax; language / split_on_newlines
    #: are the sentence splitter's). None: the backend's token-sequence scoring.
    score_continuations: Callable[..., Any] | None = None
    #: Parameters the method adds to the Pythia model of `config` (counted by --dry-run).
    extra_parameters: Callable[[ModelConfig, Any], int] = lambda config, options: 0
    #: False when build_data's batches are not GPT samples of --seq-length tokens (their
    #: size is set by the method's own data flags).
    batches_are_gpt_samples: bool = True
    supports_pipeline_parallel: bool = True
    pipeline_refusal: str = ""
    extra: dict = field(default_factory=dict)


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make a method available to `--method`; names are unique."""
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look up a registered method; unknown names list the known ones."""
    _load_builtin_methods()
    if name not in _METHODS:
        raise ConfigError(f"unknown --method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


#: The methods that ship with the project, one package each (the one place they are listed).
_BUILTINS = ("megatron_latent.methods.vanilla", "megatron_latent.methods.pondering",
             "megatron_latent.methods.thought_memory", "megatron_latent.methods.concepts")


def _load_builtin_methods() -> None:
    import importlib

    for module in _BUILTINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
