"""Resident memory that stays flat however many shards a process runs, and activations that
do not page-fault: glibc malloc settings.

Decoded images and activations (MBs each) are freed right after use, but glibc's malloc
keeps freed memory: it raises its mmap threshold to the size of every mapped block freed
(up to 32 MiB), after which such blocks come from arenas and stay there; and it gives new
threads (decode pools, task threads, torch and zarr helpers) arenas of their own, up to 8
per core. Over a run of many shards more arenas fill with memory that is free but kept,
so the peak resident size grew with the number of images though nothing live did (a
2,000-image catalogue 0.13-0.54 GB above a 250-image one; the Python-visible heap,
tracemalloc, stayed at ~32 MB). One arena per process keeps it flat: what a shard frees,
the next reuses; a shard task that ends with more than 1 GiB held free hands it back
(`release_free_memory`).

Within a shard the opposite is wanted: a batch's activations (up to 150 MB at 112x112)
are freed and allocated again every batch, and when they are mmapped each batch touches
fresh pages, so page faults were 30-45% of the CPU time of a forward pass. With mmap off
and the heap's top kept (no trim on free), the same memory is reused batch after batch.
Measured with bench/model_path.py on the 2-core VM (22:32 UTC, quiet): forward, the fused
form 89 -> 134 images/s and plain eager 35 -> 93 with these settings; forward+backward
fused 52 -> 54, eager 19 -> 25.

That reuse needs the main arena (the brk heap): a thread arena's heaps are at most 64 MiB,
so a larger block (a batch of 32 at 112x112: 154 MB) is mapped afresh in any thread that
has one, M_MMAP_MAX or not. Shard tasks run on task-runner threads, so the arena cap is 1
and must be in place before those threads first allocate: `tune_malloc` runs when the CLI
starts and when the `flows` package is imported (before its modules import pandas, whose
import starts a thread: with a second arena in place, a task thread may be handed that one),
and Dask workers and deployments start with MALLOC_ARENA_MAX=1 in their environment
(`MALLOC_ENV`). Measured on the 2-core VM (2026-12-03): the catalogue's statistics loop on a
thread, 1,024 files, 2.7-3.1 M page faults and 61-65 images/s with two arenas, 9 k and 89-90
with one; a 4,000-file catalogue in process, statistics pass 56-61 s (7 runs) before,
52.9-53.4 s with the cap set after pandas' import, 47.3-50.0 s with it set before any import.
The pass-1 forward on a thread of a fresh process (tests/test_memory.py, 2026-12-07): ~120 k
faults per batch untuned, 0 once `flows` is imported (38-114 k with the cap after pandas').
All no-ops off glibc.
"""

from __future__ import annotations

import ctypes
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt parameters (malloc.h)
ARENAS = 1  # the main arena: the only one whose heap can keep blocks over 64 MiB
MALLOC_ENV = {"MALLOC_ARENA_MAX": str(ARENAS)}  # for processes we start: in place before any thread
KEEP_TOP = 1 << 30  # free memory at the heap's top kept up to this much (released per shard instead)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def tune_malloc() -> bool:
    """Cap the arenas (existing ones stay and keep their threads, no more are made), serve
    large blocks from the heap instead of fresh mappings and keep its top when freed. Once
    per process, as early as possible."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, ARENAS) and libc.mallopt(M_MMAP_MAX, 0)
                and libc.mallopt(M_TRIM_THRESHOLD, KEEP_TOP))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_held() -> int | None:
    """Bytes malloc holds free in its arenas (mallinfo2's fordblks), None off glibc >= 2.33."""
    libc = _glibc()
    info = getattr(libc, "mallinfo2", None) if libc else None
    if info is None:
        return None
    info.restype = _Mallinfo2
    return int(info().fordblks)


def release_cuda_cache() -> None:
    """After a shard on a GPU, the CUDA caching allocator's unused blocks go back to the
    device: the next shard task, or another worker process on that GPU, finds them free."""
    torch = sys.modules.get("torch")  # no torch imported: nothing ran on a GPU here
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def release_free_memory(keep: int = KEEP_TOP) -> None:
    """Give free pages of every arena back to the OS (`malloc_trim`) once more than `keep`
    bytes are held free. Trimming after every shard cost the next shard's first batches
    their page faults again: 15% of a catalogue's statistics pass at 256 images a shard
    (bench: 92-98 vs 111-113 images/s); what a shard frees is reused by the next one, and
    the arenas are capped, so without the trim resident memory stays at the peak of one shard."""
    libc = _glibc()
    held = free_held()
    if libc and (held is None or held > keep):
        libc.malloc_trim(0)
