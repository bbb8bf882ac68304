"""Engines: the device-specific half of training (see base.Engine)."""

from __future__ import annotations

from typing import Any

import torch

from ...methods.registry import MethodSpec
from ..config import RunConfig
from .base import Engine, EvalResult, NonFiniteLossError, StepResult


def make_engine(run: RunConfig, device: torch.device, method: MethodSpec,
                method_options: Any) -> Engine:
    """The megatron-core engine on CUDA, the torch-native engine on the CPU."""
    if device.type == "cuda":
        from .megatron import MegatronEngine

        return MegatronEngine(run, device, method, method_options)
    from .cpu import CPUEngine

    return CPUEngine(run, device, method, method_options)


__all__ = ["Engine", "EvalResult", "NonFiniteLossError", "StepResult", "make_engine"]
