"""The gateway process keeps the memory a compression frees, for the next compression.

Every compression allocates and frees the same kind of buffers: the documents' cached K/V laid out in one
tensor per layer, and each forward pass's new K/V appended to it. glibc's malloc gives large freed blocks back
to the kernel (blocks of 128 KiB and more are mapped apart, and a heap whose free top grows past the trim
threshold is cut back), and each thread that allocates gets an arena of its own, so the compression thread
starts with an empty one. The next compression then faults the same pages in again: on a 2-core CPU that was
a fifth to a third of a warm compression's time (0.30-0.44 s against 0.20-0.33 s once the pages were kept).

:func:`keep_freed_memory` tells malloc to keep them: one arena for every thread, blocks below 32 MiB from the
heap, and up to 512 MiB of free heap kept before trimming. ``draft-rag serve`` calls it at startup, in each
worker process. A process that already tunes malloc (``MALLOC_ARENA_MAX``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES`` in its environment, or another allocator preloaded with
``LD_PRELOAD``) is left as it is; so is every process that is not on glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Mapping

logger = logging.getLogger("draft_rag.serve")

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

KEPT = {M_ARENA_MAX: 1, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 512 << 20}
"""What :func:`keep_freed_memory` sets: one arena, blocks below 32 MiB (glibc's largest mmap threshold) from the
heap, free heap kept up to 512 MiB."""

USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES",
                 "LD_PRELOAD")
"""Environment variables that mean the process's allocator is tuned, or replaced, already."""


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Set glibc malloc to keep freed memory for reuse (see the module's docstring); True if it was set.

    Call it before the threads that compress start (an arena is chosen at a thread's first allocation).
    Returns False, changing nothing, when ``environ`` (default ``os.environ``) names one of
    :data:`USER_SETTINGS` or the C library is not glibc.
    """
    environ = os.environ if environ is None else environ
    given = [name for name in USER_SETTINGS if environ.get(name)]
    if given:
        logger.debug("malloc left as the environment sets it (%s)", ", ".join(given))
        return False
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in KEPT.items())


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (whose ``mallopt`` takes these parameters), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None
