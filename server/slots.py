"""Preallocated slot rows: the recurrent states of every session of one model."""

from __future__ import annotations

import array
import threading

import numpy as np
import torch

from server.backends.base import ModelBackend


class SlotPool:
    """States of up to `capacity` sessions as two flat tensors, (capacity, W32) float32 and
    (capacity, W64) float64, laid out as `backend.layout` says; a session owns one row.

    A batched call gathers the rows of the sessions it advances with one indexed copy per
    tensor (a view, no copy, when the rows are consecutive) and scatters the new rows back.
    Allocation is thread-safe; rows are only touched by the event loop.
    """

    def __init__(self, backend: ModelBackend, capacity: int) -> None:
        self.backend = backend
        self.capacity = capacity
        self.layout = layout = backend.layout
        device = backend.device
        self.on_cpu = device.type == "cpu"
        self.flat32 = torch.zeros(capacity, layout.width32, device=device)
        self.flat64 = torch.zeros(capacity, layout.width64, dtype=torch.float64, device=device)
        # samples each row's session has advanced by (Stream.samples): beside the state, where
        # a prepared native step counts them (ModelBackend.rows_call)
        self.steps = array.array("q", bytes(8 * capacity))
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out low slots first
        self._lock = threading.Lock()

    @property
    def in_place(self) -> bool:
        """The backend steps this pool's rows where they lie (no gather or scatter)."""
        return self.backend.rows_in_place

    def allocate(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def allocate_run(self, n: int) -> int | None:
        """The first of `n` consecutive free rows, all taken; None when there is no such run."""
        with self._lock:
            if len(self._free) < n:
                return None
            free = np.zeros(self.capacity, bool)
            free[self._free] = True
            counts = np.concatenate(([0], np.cumsum(free)))  # free rows before each row
            starts = np.flatnonzero(counts[n:] - counts[:-n] == n)
            if not len(starts):
                return None
            first = int(starts[0])
            self._free = [s for s in self._free if not first <= s < first + n]
            return first

    def move(self, slots: list[int], first: int) -> None:
        """The rows `slots` to the run from `first` (taken by `allocate_run`), in that order;
        their old rows are freed."""
        index = torch.tensor(slots, dtype=torch.long, device=self.flat32.device)
        end = first + len(slots)
        self.flat32[first:end] = self.flat32.index_select(0, index)
        self.flat64[first:end] = self.flat64.index_select(0, index)
        self.steps[first:end] = array.array("q", [self.steps[s] for s in slots])
        with self._lock:
            self._free.extend(sorted(slots, reverse=True))

    def free(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    @property
    def in_use(self) -> int:
        with self._lock:
            return self.capacity - len(self._free)

    def index(self, slots: list[int]) -> torch.Tensor | slice:
        """Rows for a batch: a slice when `slots` are consecutive and ascending."""
        first = slots[0]
        if slots[-1] - first == len(slots) - 1 and slots == list(range(first, first + len(slots))):
            return slice(first, first + len(slots))
        return torch.tensor(slots, dtype=torch.long, device=self.backend.device)

    def gather(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, slice):
            return self.flat32[index], self.flat64[index]
        return self.flat32.index_select(0, index), self.flat64.index_select(0, index)

    def scatter(self, index: torch.Tensor | slice, flat32: torch.Tensor,
                flat64: torch.Tensor) -> None:
        if isinstance(index, slice):
            for rows, new in ((self.flat32[index], flat32), (self.flat64[index], flat64)):
                if new.data_ptr() != rows.data_ptr() or new.stride() != rows.stride():
                    rows.copy_(new)  # else a step advanced these very rows in place
        else:
            self.flat32.index_copy_(0, index, flat32)
            self.flat64.index_copy_(0, index, flat64)

    def rows(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one session's rows (to restore them later)."""
        return self.flat32[slot].clone(), self.flat64[slot].clone()

    def restore(self, slot: int, rows: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.flat32[slot].copy_(rows[0])
        self.flat64[slot].copy_(rows[1])

    def zero(self, slot: int) -> None:
        self.flat32[slot].zero_()
        self.flat64[slot].zero_()

    def load(self, slot: int, arrays: list[np.ndarray]) -> None:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        flat32, flat64 = self.layout.join([t[None] for t in tensors])
        self.flat32[slot].copy_(flat32[0])
        self.flat64[slot].copy_(flat64[0])

    def read_many(self, slots: list[int]) -> list[list[np.ndarray]]:
        """Copies of many sessions' state tensors, in one indexed copy per flat tensor."""
        index = torch.tensor(slots, dtype=torch.long, device=self.backend.device)
        views = self.layout.split(self.flat32.index_select(0, index),
                                  self.flat64.index_select(0, index))
        arrays = [v.detach().to("cpu").numpy() for v in views]  # (B, ...) each
        return [[np.ascontiguousarray(a[i]) for a in arrays] for i in range(len(slots))]

    def read(self, slot: int) -> list[np.ndarray]:
        views = self.layout.split(self.flat32[slot:slot + 1], self.flat64[slot:slot + 1])
        return [v[0].detach().to("cpu").numpy().copy() for v in views]
