"""Plain next-token training: the baseline every other method is compared against."""

from __future__ import annotations

import torch

from ...config import ModelConfig
from ...models.language_model import PythiaModel, RuntimeOptions, build_pythia_model
from ..registry import MethodSpec, register_method


def build_vanilla_model(
    model_config: ModelConfig,
    runtime: RuntimeOptions,
    device: torch.device,
    options: None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> PythiaModel:
    """The Pythia model, unchanged."""
    return build_pythia_model(model_config, runtime, device, pre_process, post_process)


VANILLA = register_method(
    MethodSpec(
        name="vanilla",
        description="next-token prediction with the plain Pythia model",
        build_model=build_vanilla_model,
    )
)
