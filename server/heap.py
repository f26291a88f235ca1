"""A fixed C-heap policy for processes that compute predict requests.

glibc serves a block above its mmap threshold with a mapping of its own and, each time such a
block is freed, raises the threshold to that block's size (up to 32 MiB). From then on the
conv view's 15-33 MB tensors come from the heap, which returns memory only from its top, and
the heap of some processes grew by 400-500 MB during one B=64 × L=16000 request (in pieces of
2 sequences) through the S4 reference network, while others stayed at ~130 MB. Here the mmap
threshold is fixed at 4 MiB: every large tensor is mapped and unmapped on its own, so a
request's peak is its working set, run after run (116-140 MB in 14 fresh processes), at the
price of fresh page faults for the few large tensors a layer still allocates (the FFTs'
outputs, the GLU, the norm: +5-15% time; the conv view keeps its other buffers,
model/kernels.py). MKL's own buffer cache is the other half (`without_mkl_buffers`).
BENCHMARKS.md (session 9) has the runs.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # below every per-layer tensor of a long sequence


def without_mkl_buffers() -> None:
    """Processes started from now on run MKL without its buffer cache, which kept 200-550 MB of
    FFT and GEMM scratch after such a request in half the runs (and was no faster). MKL reads
    this when it loads, so it takes effect in children only: call it before spawning."""
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


def fix_heap(keep_bytes: int) -> bool:
    """Blocks of 4 MiB and more get mappings of their own (unmapped when freed) and free heap
    past `keep_bytes` is returned to the system. False where the C library has no mallopt
    (musl, macOS, Windows): nothing changes there. Under a preloaded jemalloc or tcmalloc the
    call reaches glibc's mallopt and changes nothing either."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name (Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    keep = min(keep_bytes, 2**31 - 1)
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, keep) == 1
