"""What the scheduler works on: streams (a session's compute side) and the items queued on
them (frames, in-order control items, and batches of one-sample frames from a mux message)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from server.errors import ServeError
from server.slots import SlotPool


@dataclass(eq=False, slots=True)
class Frame:
    samples: np.ndarray  # (T, d_input) float32
    seq: int
    received: float  # perf_counter at receipt
    text: bool  # reply as a JSON "outputs" message
    t: int = 0  # index of the frame's first sample in the session
    done: int = 0  # samples computed so far
    pieces: list[np.ndarray] | None = None  # outputs of earlier pieces
    before: tuple[torch.Tensor, torch.Tensor] | None = None  # state rows before a long frame
    entry: int = -1  # position in a multiplexed message (mux), else -1
    piece: int = 0  # samples per round for this frame, set when it starts


@dataclass(eq=False, slots=True)
class Control:
    kind: str  # "reset" | "snapshot" | "end" | "error"
    error: ServeError | None = None
    seq: int | None = None
    entry: int = -1  # for a rejected frame of a multiplexed message: its position
    queued: bool = False  # put on the stream's queue (not applied at once)


class Sink(Protocol):
    """Where a stream's replies go (the connection that owns it)."""

    def frame_done(self, frame: Frame, outputs: np.ndarray) -> None: ...

    def frames_done(self, frames: list[Frame], outputs: np.ndarray) -> None:
        """Consecutive one-sample frames applied as one block: outputs (len(frames),
        d_output), frame j's in row j."""

    def frame_failed(self, frame: Frame, exc: Exception) -> None: ...

    def control_done(self, item: Control, value: Any) -> None: ...

    def work_dropped(self, items: list[Frame | Control]) -> None:
        """Queued frames and control items that will never be applied (the session left
        this connection), in their order."""


# what happened to each member of a Batch
BATCH_OK, BATCH_GONE, BATCH_NON_FINITE, BATCH_FAILED = 0, 1, 2, 3


@dataclass(eq=False, slots=True)
class Batch:
    """One sample for each of many distinct streams of one (model, rate), from one multiplexed
    message: stepped together (with other batches of the round) and answered in one callback,
    with no per-member objects. It is queued on each member's stream like a frame; a member is
    stepped once the batch reaches the head of its queue, and one dropped meanwhile (its epoch
    moved on) is left out, untouched."""

    pool: SlotPool
    rate: float
    streams: list[Stream]
    u: np.ndarray  # (B, d_input) float32, finite
    received: float
    sink: BatchSink
    ref: Any = None  # the sink's name for it
    epochs: list[int] = field(default_factory=list)  # each member's epoch when queued
    waiting: np.ndarray | None = None  # (B,) bool: members not stepped yet
    left: int = 0  # how many
    outputs: np.ndarray | None = None  # (B, d_output) float32
    status: np.ndarray | None = None  # (B,) uint8, BATCH_*


class BatchSink(Protocol):
    def batch_done(self, batch: Batch, outputs: np.ndarray, status: np.ndarray) -> None:
        """outputs (B, d_output) float32; status (B,) uint8, one of BATCH_*."""


@dataclass(eq=False, slots=True)
class Stream:
    """The compute-side half of a session: where its state lives and what it waits for.
    Slotted: a mux message of the usual path touches each of its streams, objects its step has
    just pushed out of cache (measured in a worker under 10 x 100 mux sessions: counting a
    sample on each took 39 us per 100-entry message with a __dict__, 16 us slotted; the step
    now counts them itself, in its pool's `steps`)."""

    pool: SlotPool
    slot: int
    rate: float
    output_last: bool
    sink: Sink | None = None
    queue: deque[Frame | Control | Batch] = field(default_factory=deque)
    queued_bytes: int = 0  # samples of the frames in `queue`
    epoch: int = 0  # moves on when the queue is dropped
    placed: float = 0.0  # when its row was last moved (monotonic seconds)
    careful: int = 0  # head frames to step one at a time (a block of them was refused)

    @property
    def samples(self) -> int:
        """Samples this session has advanced by, kept beside its state row."""
        return self.pool.steps[self.slot]

    @samples.setter
    def samples(self, value: int) -> None:
        self.pool.steps[self.slot] = value

    @property
    def model(self) -> str:
        return self.pool.backend.info.name
