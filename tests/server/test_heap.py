"""The predict processes' C-heap policy (server/heap.py)."""

from __future__ import annotations

import ctypes
import os
import platform

from server.heap import fix_heap, rss_bytes, trim, without_mkl_buffers


def test_fix_heap_takes_on_glibc():
    # glibc is what the image and CI run; elsewhere the call must change nothing and say so
    expected = platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallopt")
    assert fix_heap(256 << 20) is expected


def test_workers_started_later_run_mkl_without_its_buffer_cache(monkeypatch):
    monkeypatch.delenv("MKL_DISABLE_FAST_MM", raising=False)
    without_mkl_buffers()
    assert os.environ["MKL_DISABLE_FAST_MM"] == "1"


def test_trim_takes_on_glibc_above_its_bound_only():
    expected = platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "malloc_trim")
    assert rss_bytes() > 0
    assert trim() is expected
    assert trim(above=rss_bytes() + (1 << 30)) is False
