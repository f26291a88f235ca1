"""Preallocated slot tensors: the recurrent states of every session of one model."""

from __future__ import annotations

import threading

import numpy as np
import torch

from server.backends.base import ModelBackend


class SlotPool:
    """States of up to `capacity` sessions as tensors (capacity, *shape), one per state entry.

    A session owns one row (its slot); a batched call gathers the rows of the sessions it
    advances and scatters the new states back. Allocation is thread-safe; the rows themselves
    are only touched by the compute thread.
    """

    def __init__(self, backend: ModelBackend, capacity: int) -> None:
        self.backend = backend
        self.capacity = capacity
        self.tensors = backend.initial_state(capacity)
        self._free = list(range(capacity - 1, -1, -1))
        self._lock = threading.Lock()

    def allocate(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    @property
    def in_use(self) -> int:
        with self._lock:
            return self.capacity - len(self._free)

    def index(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.backend.device)

    def gather(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [t.index_select(0, index) for t in self.tensors]

    def scatter(self, index: torch.Tensor, state: list[torch.Tensor]) -> None:
        for target, rows in zip(self.tensors, state, strict=True):
            target.index_copy_(0, index, rows.to(target.dtype))

    def zero(self, slot: int) -> None:
        for t in self.tensors:
            t[slot].zero_()

    def load(self, slot: int, arrays: list[np.ndarray]) -> None:
        for t, a in zip(self.tensors, arrays, strict=True):
            t[slot].copy_(torch.from_numpy(np.ascontiguousarray(a)))

    def read(self, slot: int) -> list[np.ndarray]:
        return [t[slot].detach().to("cpu").numpy().copy() for t in self.tensors]
