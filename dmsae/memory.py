"""Process memory housekeeping for the long streaming loops."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A loop whose blocks vary in size (rows left after dropping BOS and outliers, compressed chunks)
    fragments glibc's heap, and its resident size creeps up batch after batch although nothing is kept.
    Trimming after each batch holds the peak flat, so it does not grow with the number of tokens."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
