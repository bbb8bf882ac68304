"""Distributed tests run under `torchrun --nproc_per_node 2` with the gloo backend.

Every rank runs the same tests in the same order; a test that re-cuts the world calls
`use_parallel(tp)` which rebuilds megatron-core's groups over the same two processes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist


def pytest_collection_modifyitems(config, items):
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        skip = pytest.mark.skip(reason="run under torchrun --nproc_per_node 2")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world():
    """Join the torchrun world (gloo, CPU, also on a machine with GPUs) once; yields
    (rank, world_size)."""
    from megatron_latent.distributed import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(), torch.device("cpu"), seed=1234)
    yield dist.get_rank(), dist.get_world_size()
    dist.barrier()


@pytest.fixture
def use_parallel(world):
    """Re-cut the two processes into TP x DP with megatron-core's parallel state."""
    from megatron.core import parallel_state

    from megatron_latent.distributed import destroy_model_parallel_groups, set_seed

    def apply(tensor_parallel_size: int, seed: int = 1234):
        destroy_model_parallel_groups()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)
        set_seed(seed, torch.device("cpu"))

    yield apply
    destroy_model_parallel_groups()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
