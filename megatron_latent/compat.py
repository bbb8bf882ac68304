"""Let megatron-core's tensor-parallel code run on a machine without CUDA.

megatron-core allocates communication buffers with `device=torch.cuda.current_device()`
(sequence-parallel all-gather / reduce-scatter, its global memory buffer, the static KV cache).
On a CPU-only build of torch that call raises, so those paths could never run. On such a
machine, and only there, the query answers "cpu": the same code then allocates on the CPU and
gloo carries the collectives. On a machine with CUDA nothing is changed.
"""

from __future__ import annotations

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
