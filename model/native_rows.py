"""A prepared native step of fixed pool rows (`NativeStep.rows_call`, model/native_step.py):
what a mux connection calls for every message of the same sessions."""

from __future__ import annotations

import array
from typing import Any

import numpy as np
import torch

KEY_BYTES = 8  # a prepared rows call's key before each input: two uint32


def checked(done: int, count: int) -> int:
    """The native step's count of rows advanced, or the error its negative code means."""
    if done == -2:
        raise ValueError(f"rows must lie in [0, {count})")
    if done < 0:
        raise MemoryError("the native step could not allocate its scratch rows")
    return done


class RowsCall:
    """A prepared native step of fixed pool rows: its outputs, flags, rows, keys and state
    pointers were checked once; a call only checks that the inputs lie inside the buffer it
    gets. Holds what its pointers point into."""

    def __init__(self, run, bound: Any, d_input: int, pool32: torch.Tensor,
                 pool64: torch.Tensor, rows: np.ndarray, y: np.ndarray, kept: np.ndarray,
                 keys: np.ndarray | None = None, counts: array.array | None = None) -> None:
        self._run, self._bound, self._d_input = run, bound, d_input
        self._keep = (pool32, pool64, rows, y, kept, keys, counts)
        self.batch = len(rows)
        self._before = 0 if keys is None else KEY_BYTES  # what a call reads before an input
        self._args = (None if keys is None else keys.ctypes.data,
                      None if counts is None else counts.buffer_info()[0], pool32.data_ptr(),
                      pool32.stride(0), pool64.data_ptr(), pool64.stride(0), y.ctypes.data,
                      y.strides[0] // 4, rows.ctypes.data, pool32.shape[0], kept.ctypes.data)

    def __call__(self, data: bytes, offset: int, stride: int) -> int | None:
        """One sample for each row, row b's d_input float32 inputs at data[offset + b *
        stride:] (with keys: after the 8 bytes that must equal row b's); y and kept written.
        Returns how many rows advanced; None when a key differs (nothing changed)."""
        last = offset + (self.batch - 1) * stride + 4 * self._d_input
        if offset < self._before or (self.batch and (stride < 4 * self._d_input + self._before
                                                     or last > len(data))):
            raise ValueError(f"{self.batch} inputs of {self._d_input} floats every {stride} "
                             f"bytes from {offset} do not fit in {len(data)} bytes")
        if not self.batch:
            return 0
        done = self._run(self._bound.ref, self.batch, data, offset, stride, *self._args)
        if done == -3:
            raise ValueError("inputs must lie on whole floats (offset and stride)")
        if done == -5:
            return None
        return checked(done, self._args[9])
