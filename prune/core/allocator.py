"""Give freed memory back to the system between scoring chunks (glibc only).

glibc's malloc serves a block from `mmap` (returned to the system when freed) only above a
threshold that starts at 128 KiB and rises to the size of the largest such block freed, up to
32 MiB. After the first large tensor is freed, tensors of a few MiB (one image's feature maps at
224²) come from the heap, whose freed holes stay resident, and the scoring thread's own arena
keeps its holes too. Scoring VGG16 at 224² this way held 0.4 GiB more at its peak (CHIP, 2
classes × 20 images: 2.24 GiB; 1.79 with `malloc_trim` after every chunk). Fixing the mmap
threshold instead (MALLOC_MMAP_THRESHOLD_) did as well but made every large temporary a fresh
mapping: the embedded data set took 40% longer to draw.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import time


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    return libc


MIN_INTERVAL_S = 0.25
"""Least seconds between two releases: a chunk of 224² maps takes longer than that to score, so
each is followed by one; the embedded default's chunks (tens of ms) mostly are not (a release makes
the next allocations fault their pages in again: about 0.5 s of its 3 s of scoring when done
after every chunk)."""
_last_release = [float("-inf")]


def release_freed_memory() -> bool:
    """Return the freed pages of every malloc arena to the system (glibc's `malloc_trim(0)`), at
    most once every `MIN_INTERVAL_S`; True if any were returned, False where nothing was called
    (not glibc, or too soon after the last release) or nothing was free."""
    libc, now = _glibc(), time.monotonic()
    if libc is None or now - _last_release[0] < MIN_INTERVAL_S:
        return False
    _last_release[0] = now
    return libc.malloc_trim(0) == 1
