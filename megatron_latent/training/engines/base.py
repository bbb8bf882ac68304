"""What every engine does for the loop, and the pieces both engines share.

An engine owns the model replicas, the optimizer and the device-specific mechanics of one
optimizer step (gradient accumulation, data-parallel reduction, mixed precision, clipping).
The loop hands it the micro-batches of one global batch and gets back reduced numbers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...methods.registry import MethodSpec
from ..config import RunConfig

#: An aux key ending so is a sum over the micro-batch that the engines normalise like the LM
#: loss sum (by the global batch's loss-mask sum) and add to the optimised loss; a key ending
#: in "_loss" is a per-micro-batch mean, averaged over micro-batches and ranks.
SUMMED_AUX_LOSS = "_loss_sum"


class NonFiniteLossError(RuntimeError):
    """Raised under --exit-on-nan when a loss or gradient norm is NaN/Inf."""


@dataclass
class StepResult:
    """One optimizer step, reduced over every rank: the global per-token mean LM loss."""

    lm_loss: float
    aux: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    skipped: bool = False
    nan: bool = False
    tokens: int = 0
    loss_scale: float | None = None


@dataclass
class EvalResult:
    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


def split_model_output(output: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """A method's model returns per-token loss, or (per-token loss, aux dict); see
    SUMMED_AUX_LOSS for how aux losses enter the objective."""
    if isinstance(output, tuple):
        loss, aux = output
        return loss, dict(aux or {})
    return output, {}


def model_inputs(batch: dict[str, Tensor], device: torch.device,
                 use_attention_mask: bool, use_position_ids: bool = False) -> dict[str, Tensor]:
    """Keyword arguments for a model call from a megatron GPTDataset micro-batch: the
    document-resetting attention mask (--reset-attention-mask) and positions
    (--reset-position-ids) are passed only when asked for."""
    inputs = {
        "input_ids": batch["tokens"].to(device, non_blocking=True),
        "labels": batch["labels"].to(device, non_blocking=True),
    }
    if use_attention_mask:
        if "attention_mask" not in batch:
            raise ValueError("--reset-attention-mask: the batch carries no attention_mask")
        inputs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    if use_position_ids:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    return inputs


def is_finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def any_rank_has_nonfinite(tensors: list[Tensor], device: torch.device, group=None) -> bool:
    """Whether any of `tensors`, on any rank of `group` (default: every rank), holds a NaN or
    an Inf. One reduction per tensor and one collective; no full-size temporaries (a NaN or
    Inf anywhere makes a tensor's sum non-finite)."""
    flag = torch.zeros(1, dtype=torch.float32, device=device)
    for tensor in tensors:
        if tensor.numel():
            flag += (~torch.isfinite(tensor.detach().float().sum())).float()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


class Engine(ABC):
    """Device-specific half of training; the loop (trainer.py) is the other half."""

    name: str = "engine"

    def __init__(self, run: RunConfig, device: torch.device, method: MethodSpec,
                 method_options: Any):
        self.run = run
        self.device = device
        self.method = method
        self.method_options = method_options
        self.optimizer: Any = None

    @abstractmethod
    def build(self) -> None:
        """Build the model replica(s) of this rank and the optimizer."""

    @abstractmethod
    def train_step(self, microbatches: list[dict[str, Tensor]]) -> StepResult:
        """Forward/backward every micro-batch, reduce, clip and step the optimizer."""

    @abstractmethod
    def evaluate(self, microbatches: list[dict[str, Tensor]]) -> EvalResult:
        """Sum of per-token LM loss and token count over the batches, reduced over DP."""

    @abstractmethod
    def unwrapped_model(self) -> torch.nn.Module:
        """The bare model (no DDP / fp16 wrapper) on this rank."""

    @abstractmethod
    def model_state(self) -> dict[str, Tensor]:
        """This rank's canonical model shard, for checkpoints."""

    @abstractmethod
    def load_model_state(self, shard: dict[str, Tensor]) -> None: ...

    @abstractmethod
    def optimizer_state(self, directory: str) -> dict[str, Any]:
        """Optimizer state for this rank's checkpoint file (may write extra files into
        `directory`, e.g. the distributed optimizer's parameter state)."""

    @abstractmethod
    def load_optimizer_state(self, state: dict[str, Any], directory: str) -> None: ...

    def batch_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Model keyword arguments for one micro-batch: the method's own, or the GPT batch's
        as the run's data flags ask."""
        if self.method.model_inputs is not None:
            return self.method.model_inputs(batch, self.device)
        return model_inputs(batch, self.device, self.run.data.reset_attention_mask,
                            self.run.data.reset_position_ids)

    def after_weights_loaded_without_optimizer(self) -> None:
        """Refresh optimizer-held copies of the weights (fp32 main params) after a load that
        skipped the optimizer state; nothing to do where the optimizer reads the weights."""
        return None

    def memory_stats(self) -> dict[str, float]:
        """Peak memory of this rank in GiB, where the device can tell."""
        if self.device.type == "cuda":
            return {"peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
        try:
            import resource

            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return {"peak_rss_gib": peak_kib / 2**20}
        except (ImportError, OSError):
            return {}
