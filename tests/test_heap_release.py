"""The CPU engine's heap release: with glibc, free heap pages that pile up when large aligned
blocks are freed and reallocated (what pondering's vocabulary-sized tensors do) go back to the
OS. Each variant runs in a fresh process, so glibc starts from the same state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_latent.training.engines.heap_release import glibc_malloc

ROOT = Path(__file__).resolve().parents[1]

CHURN = """
import sys, torch
from megatron_latent.training.engines.heap_release import HeapRelease, resident_anonymous_bytes
release = HeapRelease(min_bytes=int(sys.argv[1]))
survivors = []
release.after_step()
for step in range(int(sys.argv[2])):
    blocks = []
    for i in range(12):  # ~16 MiB tensors of slightly different sizes, freed every step
        blocks.append(torch.ones((16 * 2**20 + 4096 * (i % 3)) // 4))
        survivors.append(torch.ones(64 + step))  # small tensors that outlive the step
    del blocks
    release.after_step()
print(resident_anonymous_bytes(), release.releases)
"""


def churn(min_bytes: int, steps: int = 40) -> tuple[int, int]:
    result = subprocess.run([sys.executable, "-c", CHURN, str(min_bytes), str(steps)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    resident, releases = result.stdout.split()[-2:]
    return int(resident), int(releases)


@pytest.mark.skipif(glibc_malloc() is None, reason="needs glibc >= 2.33")
def test_free_heap_pages_are_returned_between_steps():
    kept, no_releases = churn(0)  # 0 turns the release off
    baseline, _ = churn(0, steps=0)
    if kept - baseline < 128 * 2**20:  # e.g. an allocator other than glibc's malloc preloaded
        pytest.skip(f"without the release only {(kept - baseline) / 2**20:.0f} MiB pile up in "
                    "this process: nothing to return")
    released, releases = churn(64 * 2**20)
    assert no_releases == 0 and releases >= 1
    assert kept - released > 128 * 2**20, (kept / 2**20, released / 2**20)
