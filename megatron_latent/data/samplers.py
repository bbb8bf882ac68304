"""Megatron-style pretraining batch sampler and the per-rank DataLoader.

The global sample order is simply ``consumed_samples, consumed_samples + 1, ...`` (the datasets
are already shuffled by megatron-core). Each block of ``micro_batch_size * data_parallel_size``
consecutive indices is one micro-step across data-parallel ranks, and rank ``r`` takes the
``r``-th slice of it. Hence concatenating the ranks' micro-batches of a step gives the same
global batch for any data-parallel size, and resuming from ``consumed_samples`` continues the
sequence exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


class PretrainingSampler:
    """Yields this rank's micro-batch indices (as Megatron-LM's MegatronPretrainingSampler).

    With ``drop_last=False`` the final partial block is split the same way, so ranks whose
    slice of it is empty get no batch for it.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be in [0, total_samples "
                f"({total_samples})]"
            )
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank ({data_parallel_rank}) must be in [0, "
                f"data_parallel_size ({data_parallel_size}))"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Number of micro-batches this rank will yield."""
        block = self.micro_batch_times_data_parallel_size
        remaining = self.total_samples - self.consumed_samples
        full = remaining // block
        if self.drop_last or remaining % block == 0:
            return full
        start, _ = self._slice()
        return full + (1 if remaining % block > start else 0)

    def _slice(self) -> tuple[int, int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return start, start + self.micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        block = self.micro_batch_times_data_parallel_size
        start, end = self._slice()
        first = self.consumed_samples
        while first + block <= self.total_samples:
            yield list(range(first + start, first + end))
            first += block
        if not self.drop_last and first < self.total_samples:
            tail = list(range(first, self.total_samples))[start:end]
            if tail:
                yield tail


def build_pretraining_data_loader(
    dataset: Any,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
    seed: int = 0,
) -> torch.utils.data.DataLoader | None:
    """A DataLoader over this rank's micro-batches, starting after ``consumed_samples``.

    Returns None when ``dataset`` is None (a split that was not built). Samples are the
    datasets' dicts (``tokens``, ``labels``, ``loss_mask``, ``position_ids``, ...) stacked by
    the default collate. The loader draws its worker seeds from its own generator (seeded
    with ``seed``), never from the global RNG: creating or re-creating a loader (at start-up,
    after a resume, for every evaluation) must not shift the random stream that dropout uses.
    """
    if dataset is None:
        return None
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        drop_last=drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
