"""Give the free pages of glibc's heap back to the OS between CPU training steps.

Every CPU tensor is a 64-byte-aligned posix_memalign block. Once a large block has been freed,
glibc raises its mmap threshold to that size, so later blocks of that size come from the heap;
there an aligned block seldom fits the hole an equal one left, and the heap grows by free holes
whose pages stay resident. Pondering frees and reallocates dozens of vocabulary-sized blocks per
step, so its resident memory climbs for hundreds of steps (docs/pondering.md, "Memory on the
CPU engine"). `HeapRelease` watches that free-but-resident memory and calls malloc_trim(0) when
it piles up; nothing in use moves, so every computed value is unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: The CPU engine returns the free pages of glibc's heap to the OS once the resident memory
#: that malloc does not hold in use exceeds its level after the first step by more than this,
#: or by the heap's free bytes after the first step where those are more. 0 turns it off.
HEAP_RELEASE_MIN_BYTES = 256 * 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def glibc_malloc() -> ctypes.CDLL | None:
    """The running process's C library if it is glibc >= 2.33 (mallinfo2, malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def resident_anonymous_bytes() -> int | None:
    """Anonymous resident memory of this process (RSS less file-backed and shared pages)."""
    try:
        with open("/proc/self/statm") as handle:
            fields = handle.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


class HeapRelease:
    """Returns free pages of glibc's heap to the OS when they pile up between steps.

    Every CPU tensor is a 64-byte-aligned posix_memalign block. Once a vocabulary-sized block
    has been freed, glibc raises its mmap threshold to that size and later ones come from the
    heap, where an aligned block seldom fits the hole an equal one left: the heap grows by
    free holes that stay resident, and holes released once fill up again as they are reused
    (docs/pondering.md, "Memory on the CPU engine"). malloc_trim(0) hands their pages back;
    nothing in use moves, so every value computed is unchanged. A no-op without glibc.
    """

    def __init__(self, min_bytes: int | None = None):
        min_bytes = HEAP_RELEASE_MIN_BYTES if min_bytes is None else min_bytes
        self._libc = glibc_malloc() if min_bytes > 0 else None
        self.min_bytes = min_bytes
        self.budget = 0
        self.limit: int | None = None
        self.releases = 0

    def idle_bytes(self) -> int | None:
        """Anonymous resident memory that malloc does not hold in use: free heap pages, and
        memory malloc does not manage."""
        if self._libc is None:
            return None
        resident = resident_anonymous_bytes()
        if resident is None:
            return None
        info = self._libc.mallinfo2()
        return resident - info.uordblks - info.hblkhd

    def after_step(self) -> None:
        idle = self.idle_bytes()
        if idle is None:
            return
        if self.limit is None:
            self.budget = max(self.min_bytes, self._libc.mallinfo2().fordblks)
            self.limit = idle + self.budget
        elif idle > self.limit:
            self._libc.malloc_trim(0)
            self.releases += 1
            # What a release leaves resident is not free heap: the next one waits for more.
            self.limit = max(self.limit, (self.idle_bytes() or 0) + self.budget)
