"""glibc malloc thresholds, set in a running process (what xp would do at start-up).

By default glibc returns freed memory at the top of the heap to the kernel (trim) and
serves large requests with fresh ``mmap``s, under thresholds that adapt upwards only
slowly; a training loop that frees and reallocates the same large tensors every step
can then pay a minor page fault for every page, every step. ``MALLOC_MMAP_THRESHOLD_``
and ``MALLOC_TRIM_THRESHOLD_`` fix both at start-up; ``mallopt`` does the same later.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""glibc's largest mmap threshold on 64-bit (the value of ``MALLOC_MMAP_THRESHOLD_``)."""
TRIM_THRESHOLD = 2**31 - 1
"""mallopt takes an int: the largest one stands in for ``MALLOC_TRIM_THRESHOLD_=4294967296``."""


def tune_malloc() -> bool:
    """Set both thresholds with ``mallopt``; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
