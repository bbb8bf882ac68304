"""Let megatron-core's tensor-parallel code run on the CPU, also on a machine that has CUDA.

megatron-core allocates communication buffers with `device=torch.cuda.current_device()`
(sequence-parallel all-gather / reduce-scatter, its global memory buffer, the static KV cache).
On a CPU-only build of torch that call raises; on a GPU machine it answers cuda:N, and a rank
that computes on the CPU would then mix CUDA buffers with CPU weights. So while this process
computes on the CPU the query answers "cpu" (the same code then allocates on the CPU and gloo
carries the collectives), and once it computes on CUDA the original answer is back.
"""

from __future__ import annotations

import logging
import warnings

import torch

_MARK = "_megatron_latent_cpu_device"


def _original_current_device():
    current = torch.cuda.current_device
    return getattr(current, "_megatron_latent_original", current)


def routed_to_cpu() -> bool:
    """Whether `torch.cuda.current_device()` currently answers "cpu" (see below)."""
    return bool(getattr(torch.cuda.current_device, _MARK, False))


def route_cuda_device_queries(device: torch.device | str) -> bool:
    """Make `torch.cuda.current_device()` answer "cpu" while this process computes on the CPU
    (``device`` is the CPU) and restore torch's own answer otherwise. Returns True when the
    CPU answer is in place."""
    original = _original_current_device()
    if torch.device(device).type != "cpu":
        torch.cuda.current_device = original
        return False
    if routed_to_cpu():
        return True

    def current_device() -> str:
        return "cpu"

    setattr(current_device, _MARK, True)
    current_device._megatron_latent_original = original
    torch.cuda.current_device = current_device
    return True


#: megatron-core announces at import time that optional CUDA libraries are absent, once per
#: module; on a CPU machine (and wherever the engine line says which backend runs) that is
#: expected, so exactly these notices are dropped and every other warning is kept.
_EXPECTED_NOTICES = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "Transformer Engine is not installed",
)


class _DropMockCacheNotice(logging.Filter):
    """--mock-data builds its indices in memory; megatron-core logs that it cannot cache them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unable to save MockGPTDataset indexes" not in record.getMessage()


def quiet_expected_notices() -> None:
    """Silence megatron-core's start-up notices about absent optional libraries (apex,
    transformer-engine) and the mock-data cache notice; nothing else is filtered."""
    for notice in _EXPECTED_NOTICES:
        warnings.filterwarnings("ignore", message=notice, category=UserWarning)
    dataset_logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
    if not any(isinstance(f, _DropMockCacheNotice) for f in dataset_logger.filters):
        dataset_logger.addFilter(_DropMockCacheNotice())
