"""Process groups, megatron-core parallel state, seeding and the compute device.

One entry point, `initialize_parallel`, serves torchrun jobs (NCCL on GPUs, gloo on CPU)
and plain single-process use (tests, notebooks), so the model code never asks where it runs.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from .compat import route_cuda_device_queries, routed_to_cpu
from .config import ConfigError


@dataclass(frozen=True)
class ParallelConfig:
    """How the world is cut: tensor x pipeline x data parallel."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor parallel size "
                f"{self.tensor_model_parallel_size} x pipeline parallel size "
                f"{self.pipeline_model_parallel_size}"
            )
        return world_size // model_parallel

    def validate(self, world_size: int) -> None:
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ConfigError("tensor and pipeline parallel sizes must be >= 1")
        self.data_parallel_size(world_size)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(device: torch.device, timeout_minutes: float = 10.0) -> None:
    """Join the job torchrun describes in the environment, or form a world of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a world of one, without touching the environment child processes inherit
        dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{_free_port()}")


def _reset_global_memory_buffer() -> None:
    """megatron-core keys its reusable buffers by name and dtype, not device: once the process
    switches between CPU and CUDA compute, buffers made for the other device must go."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_global_memory_buffer()
        parallel_state._set_global_memory_buffer()


def initialize_parallel(
    parallel: ParallelConfig, device: torch.device | None = None, seed: int = 1234
) -> torch.device:
    """Create the process group, megatron-core's model-parallel groups and seeded RNGs.

    Returns the device this rank computes on. Safe to call again with the same layout.
    """
    device = device or default_device()
    was_cpu = routed_to_cpu()
    if route_cuda_device_queries(device) != was_cpu:
        _reset_global_memory_buffer()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    parallel.validate(world_size)
    init_process_group(device)
    world_size = dist.get_world_size()
    parallel.validate(world_size)
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size()
            == parallel.tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size()
            == parallel.pipeline_model_parallel_size
        )
        if not same:
            destroy_model_parallel_groups()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        )
    set_seed(seed, device)
    return device


def stage_seed(seed: int) -> int:
    """The seed of this rank's pipeline stage: ``seed + 100 * pp_rank`` as in Megatron-LM, so
    stages (which hold different layers) do not draw identical initial weights and dropout."""
    if parallel_state.model_parallel_is_initialized():
        return seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    return seed


def set_seed(seed: int, device: torch.device) -> None:
    """Seed python, numpy and torch identically on every rank of a pipeline stage (offset per
    stage, see `stage_seed`), plus megatron's TP RNG tracker.

    On CUDA, megatron-core tracks a separate generator for tensor-parallel regions. On the
    CPU that tracker cannot exist (it wraps CUDA generators), so its fork() becomes a no-op
    and dropout inside tensor-parallel regions draws from the default generator.
    """
    seed = stage_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def destroy_model_parallel_groups() -> None:
    """Destroy every process group but the default one, then megatron-core's parallel state.

    megatron-core's destroy_model_parallel only forgets its groups; destroying them frees
    their communicators (gloo keeps three threads per group), which otherwise pile up with
    every re-initialisation to another layout."""
    default = dist.distributed_c10d._get_default_group() if dist.is_initialized() else None
    for group in list(dist.distributed_c10d._world.pg_map) if default is not None else []:
        if group is not default:
            dist.destroy_process_group(group)
    parallel_state.destroy_model_parallel()


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the process group (tests, re-initialisation)."""
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel_groups()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Sum, across the TP group, the gradients of replicated parameters that only saw a
    sequence shard (LayerNorms under sequence parallelism); megatron-core's
    finalize_model_grads does the same on its CUDA path."""
    if tp_size() == 1:
        return
    grads = [
        p.grad for p in model.parameters()
        if getattr(p, "sequence_parallel", False) and p.grad is not None
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group())
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def gather_tensor_parallel(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each TP rank's shard of `tensor` along `dim` (autograd-free; for
    inspection, generation and tests)."""
    size = tp_size()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group())
    return torch.cat(parts, dim=dim)
