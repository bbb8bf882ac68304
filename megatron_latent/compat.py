"""Let megatron-core's tensor-parallel code run on a machine without CUDA.

megatron-core allocates communication buffers with `device=torch.cuda.current_device()`
(sequence-parallel all-gather / reduce-scatter, its global memory buffer, the static KV cache).
On a CPU-only build of torch that call raises, so those paths could never run. On such a
machine, and only there, the query answers "cpu": the same code then allocates on the CPU and
gloo carries the collectives. On a machine with CUDA nothing is changed.
"""

from __future__ import annotations

import logging
import warnings

import torch

_MARK = "_megatron_latent_cpu_device"


def route_cuda_device_queries_to_cpu() -> bool:
    """Install the CPU answer for `torch.cuda.current_device()`; True if it is in place."""
    if torch.cuda.is_available():
        return False
    if getattr(torch.cuda.current_device, _MARK, False):
        return True

    def current_device() -> str:
        return "cpu"

    setattr(current_device, _MARK, True)
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
