"""Resident memory that stays flat however many shards a process runs: glibc malloc settings.

Decoded images and activations (MBs each) are freed right after use, but glibc's malloc
keeps freed memory: it raises its mmap threshold to the size of every mapped block freed
(up to 32 MiB), after which such blocks come from arenas and stay there; and it gives new
threads (decode pools, task threads, torch and zarr helpers) arenas of their own, up to 8
per core. Over a run of many shards more arenas fill with memory that is free but kept,
so the peak resident size grew with the number of images though nothing live did (a
2,000-image catalogue 0.13-0.54 GB above a 250-image one; the Python-visible heap,
tracemalloc, stayed at ~32 MB). A fixed threshold, two arenas per process and handing free
pages back when a shard task ends keep it flat. All no-ops off glibc.
"""

from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt parameters (malloc.h)
ARENAS = 2  # one for the thread running the model, one shared by the decode threads
MMAP_THRESHOLD = 1 << 20  # fixed (glibc raises it up to 32 MiB as mapped blocks are freed, then keeps them)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def tune_malloc(arenas: int = ARENAS) -> bool:
    """Fix the mmap threshold and cap the arenas (existing ones stay, no more are made). Once per process."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, arenas) and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_free_memory() -> None:
    """Give free pages of every arena back to the OS (`malloc_trim`); milliseconds."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
