"""A fixed C-heap policy for processes that compute predict requests.

glibc serves a block above its mmap threshold with a mapping of its own and, each time such a
block is freed, raises the threshold to that block's size (up to 32 MiB). From then on the
conv view's large tensors come from the heap, which returns memory only from its top, and the
heap of some processes grew by 400-500 MB during one B=64 × L=16000 request through the S4
reference network (session 9), while others stayed at ~130 MB. So the threshold is fixed, at
16 MiB: a tensor of a pass (one sequence of the reference network: 8 MB activations, 16 MB
spectra) below it is reused from the heap with no page faults (a fixed 4 MiB threshold mapped
and unmapped every one of them: B=64 × L=16000 in passes of one sequence on two threads took
890-920 ms against 660-700 ms at 16 MiB, session 26). A request's pass threads share the
process's one glibc arena (an arena per thread held twice the memory), and the free memory is
given back after a request that left the process holding more than `predict_memory_mb` over
its size when it was ready (`trim`). MKL's own buffer cache is the other half
(`without_mkl_buffers`). BENCHMARKS.md has the runs.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 16 << 20  # above a one-sequence pass's tensors (digits: 4 MB, 4 × 128: 8)


def without_mkl_buffers() -> None:
    """Processes started from now on run MKL without its buffer cache, which kept 200-550 MB of
    FFT and GEMM scratch after such a request in half the runs (and was no faster). MKL reads
    this when it loads, so it takes effect in children only: call it before spawning."""
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


def fix_heap(keep_bytes: int) -> bool:
    """Blocks of 16 MiB and more get mappings of their own (unmapped when freed) and free heap
    past `keep_bytes` is returned to the system. False where the C library has no mallopt
    (musl, macOS, Windows): nothing changes there. Under a preloaded jemalloc or tcmalloc the
    call reaches glibc's mallopt and changes nothing either."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name (Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    keep = min(keep_bytes, 2**31 - 1)
    # one arena for every thread: an arena per pass thread kept its own free blocks, and two
    # threads peaked at 416 MB over start against 175 MB with one (same time, session 26)
    return (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, keep) == 1
            and mallopt(M_ARENA_MAX, 1) == 1)


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim(above: int = 0) -> bool:
    """Give every arena's free memory back to the system (glibc malloc_trim) when this
    process holds more than `above` bytes; True if it did. Not after every request: pages
    given back fault in again on the next one (+5-7 ms on a 18 ms request)."""
    if above and rss_bytes() <= above:
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True
