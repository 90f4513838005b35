"""Process memory housekeeping for the long streaming loops."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEPT_HEAP_BYTES = 1 << 30  # free memory at the heap's top that glibc keeps rather than hands back
HEAP_BLOCK_BYTES = 32 << 20  # blocks up to this size come from the heap (glibc's largest allowed threshold)


@cache
def _libc_function(name: str) -> Callable[..., int] | None:
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim")


@cache
def keep_freed_heap() -> bool:
    """Make glibc keep freed memory for the process's next allocations instead of handing it back to the OS at once
    (a no-op elsewhere; once per process). A training step frees and allocates the same tens of MB every step;
    by default glibc returns them between steps (its thresholds adapt to the largest block freed), and each step
    then pays a page fault for every 4 KiB it touches again: the float32 step at the bench shape ran 1.07x faster
    without that (BENCHMARKS.md), the same bits. `release_free_heap` still trims when a loop asks it to."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_HEAP_BYTES))


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A loop whose blocks vary in size (rows left after dropping BOS and outliers, compressed chunks)
    fragments glibc's heap, and its resident size creeps up batch after batch although nothing is kept.
    Trimming after each batch holds the peak flat, so it does not grow with the number of tokens."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
