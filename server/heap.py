"""A fixed C-heap policy for processes that compute predict requests.

glibc serves a block above its mmap threshold with a mapping of its own and, each time such a
block is freed, raises the threshold to that block's size (up to 32 MiB). From then on the
conv view's 10-33 MB tensors come from the heap, whose free space goes back to the system only
from its top: after one B=64 × L=16000 request (in pieces of 2 sequences) the S4 reference
network's process held 430-725 MB over its start in some runs and 130 MB in others. With both
thresholds fixed the same request peaks at 90-130 MB every time, at the same speed (a
threshold of 4 MiB also bounds it, but every large tensor then costs fresh page faults: +30-50%
time). MKL's own buffer cache is the other half (`without_mkl_buffers`). BENCHMARKS.md has
the runs.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest; the conv's buffers above it are kept and reused


def without_mkl_buffers() -> None:
    """Processes started from now on run MKL without its buffer cache, which kept 200-550 MB of
    FFT and GEMM scratch after such a request in half the runs (and was no faster). MKL reads
    this when it loads, so it takes effect in children only: call it before spawning."""
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


def fix_heap(keep_bytes: int) -> bool:
    """Blocks of 32 MiB and more get mappings of their own (unmapped when freed) and free heap
    past `keep_bytes` is returned to the system. False where the C library has no mallopt
    (musl, macOS): nothing changes there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    keep = min(keep_bytes, 2**31 - 1)
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, keep) == 1
