"""Shared fixtures. Model tests run in one process with a gloo world of one."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def single_process_parallel():
    """megatron-core parallel state for a world of one (TP=1, PP=1) on the CPU (also on a
    machine with a GPU: these are CPU tests)."""
    import torch

    from megatron_latent.distributed import ParallelConfig, initialize_parallel

    return initialize_parallel(ParallelConfig(), torch.device("cpu"), seed=1234)
