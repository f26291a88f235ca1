"""The step scheduler: batched recurrent steps of many sessions, on the event loop.

Each session (a `Stream`) has a FIFO of items: data frames and in-order control items (reset,
snapshot, end, an error reply). A round takes every ready stream (at most `max_batch`), runs
the control items at their heads, and advances the head frame of each by at most `piece`
samples (one sample for frames of at most STEPPED_FRAMES) in one call per group: one-sample
pieces of one (model, rate) as one batched `step`, pieces of one (model, rate, T) as one
batched `chunk`; on a pool stepped in place, a session's queued one-sample frames advance as
one block (server/sample_rounds.py). How a frame is cut into pieces depends only on its own
length, never on other sessions, so batching changes a session's numbers by float32 rounding
at most (docs/server.md gives the measured bound).

Ticks run on the event loop between reads: a tick batches whatever arrived since the last one
(in rounds, up to a time budget, when sessions have several frames queued),
and no other thread competes for the GIL (a compute thread spent most of its time waiting for
it). Replies go straight to each stream's `Sink`, which writes them to its socket.
Work for a stream that is gone is dropped at once (`release`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from server.batch_rounds import BatchRounds
from server.cork import CORK
from server.errors import ServeError
from server.metrics import FlushTimer, Metrics, ModelMetrics
from server.sample_rounds import SampleRounds
from server.slots import SlotPool
from server.work import (
    Batch,
    BatchSink,
    Control,
    Frame,
    Sink,
    Stream,
)

__all__ = ["Batch", "BatchSink", "Control", "Frame", "Scheduler", "Sink", "Stream"]

log = logging.getLogger("s4serve.scheduler")
# Frames this short are advanced one sample per round, batched with the per-sample sessions:
# measured (motion, B=1 and B=1000), a chunk of T=2 costs 1.5-1.9x two steps; T=10, 0.4-0.5x.
STEPPED_FRAMES = 4


class Scheduler(SampleRounds, BatchRounds):
    def __init__(self, metrics: Metrics, max_batch: int = 1024, tick: float = 0.0,
                 piece: int = 256, max_queued: int = 1 << 16, max_lag: float = 1.0,
                 budget: float = 0.02, press_lag: float = 0.1,
                 max_queued_bytes: int = 256 << 20) -> None:
        self.metrics = metrics
        self.max_batch = max_batch
        self.tick = tick
        self.piece = piece
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.max_lag = max_lag
        self.press_lag = press_lag
        self.budget = budget  # seconds of compute per tick before sockets are read again
        self.lag = 0.0  # age of the oldest unstarted head frame at the last tick, seconds
        self.ticks = 0
        self._ready: OrderedDict[Stream, None] = OrderedDict()
        self._batches: list[Batch] = []
        self.drops = 0  # streams dropped so far (a mux connection's routes check it)
        self._no_run_until: dict[SlotPool, float] = {}  # see batch_rounds.RETRY_S
        self._models: dict[SlotPool, ModelMetrics] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False
        self._after_tick: list[Callable[[], None]] = []
        self.flushes = FlushTimer(self._models)

    # ----- lifecycle ---------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.flushes.loop = loop

    def stop(self) -> None:
        self._ready.clear()
        self.flush_metrics()

    @property
    def idle(self) -> bool:
        return not self._ready and not self._batches

    def open(self, pool: SlotPool, rate: float, output_last: bool,
             state: list[np.ndarray] | None, samples: int = 0) -> Stream | None:
        """A stream in a fresh slot holding `state` (zeros when None); None when full."""
        slot = pool.allocate()
        if slot is None:
            return None
        try:
            pool.zero(slot) if state is None else pool.load(slot, state)
        except Exception:
            pool.free(slot)
            raise
        self._model(pool)
        stream = Stream(pool=pool, slot=slot, rate=rate, output_last=output_last)
        stream.samples = samples
        return stream

    # ----- what connections call ---------------------------------------------------------
    def overloaded(self, pool: SlotPool) -> bool:
        """Past capacity: this model's queue is full (frames or bytes), or frames wait longer
        than max_lag."""
        lagging = bool(self._ready) and self.lag > self.max_lag  # stale once queues are empty
        model = self._model(pool)
        return (lagging or model.queued >= self.max_queued
                or model.queued_bytes >= self.max_queued_bytes)

    @property
    def pressed(self) -> bool:
        """Under pressure: frames wait longer than press_lag. Connections then keep only a
        few frames each in the queue and leave the rest in their sockets (backpressure), which
        costs nothing, instead of piling up work until frames must be refused."""
        return self.lag > self.press_lag and bool(self._ready)

    def _model(self, pool: SlotPool) -> ModelMetrics:
        model = self._models.get(pool)
        if model is None:
            model = self._models[pool] = ModelMetrics(self.metrics, pool.backend.info.name)
        return model

    def submit(self, stream: Stream, item: Frame | Control) -> None:
        """Queue an item behind the stream's earlier ones; a tick will answer it."""
        stream.queue.append(item)
        if type(item) is Frame:
            model = self._models[stream.pool]
            model.queued += 1
            model.queued_bytes += item.samples.nbytes
            stream.queued_bytes += item.samples.nbytes
        if stream not in self._ready:
            self._ready[stream] = None
        self._wake()

    def after_tick(self, callback: Callable[[], None]) -> None:
        """Call `callback` at the end of a tick (this one, when called from within it). A
        connection that answered frames `overloaded` stops reading until then: answering
        costs about as much as computing, so reading and refusing a flood of frames would
        take the loop from the ticks that end the overload (measured: a collapse to ~10% of
        capacity at 1000 sessions)."""
        self._after_tick.append(callback)
        self._wake()

    def _wake(self) -> None:
        if not self._pending:
            self._pending = True
            if self.tick:
                self._loop.call_later(self.tick, self._tick)
            else:
                self._loop.call_soon(self._tick)

    def snapshot(self, stream: Stream) -> tuple[int, list[np.ndarray]]:
        """The state now (every item queued so far not yet applied)."""
        return stream.samples, stream.pool.read(stream.slot)

    def drop(self, stream: Stream) -> int:
        """Forget the stream's queued work (its connection is gone); returns frames dropped.
        A frame that was partly computed is undone, so the state ends on a frame boundary."""
        head = stream.queue[0] if stream.queue else None
        if type(head) is Frame and head.done and head.before is not None:
            stream.pool.restore(stream.slot, head.before)
            stream.samples -= head.done
        items = [item for item in stream.queue if type(item) is not Batch]
        if items and stream.sink is not None:
            stream.sink.work_dropped(items)
        dropped = sum(1 for item in stream.queue if type(item) is not Control)
        if dropped:
            model = self._models[stream.pool]
            model.queued -= dropped
            model.queued_bytes -= stream.queued_bytes
            model.queue.set(model.queued)
        stream.queue.clear()
        stream.queued_bytes = 0
        stream.epoch += 1  # batches still holding it leave it out
        self.drops += 1
        self._ready.pop(stream, None)
        return dropped

    def release(self, stream: Stream) -> tuple[int, list[np.ndarray]]:
        """Drop queued work, free the slot; returns the final (samples, state)."""
        self.drop(stream)
        snapshot = self.snapshot(stream)
        stream.pool.free(stream.slot)
        stream.sink = None
        return snapshot

    def reset(self, stream: Stream) -> None:
        stream.pool.zero(stream.slot)
        stream.samples = 0

    # ----- the tick ----------------------------------------------------------------------
    def _tick(self) -> None:
        """Rounds of batched calls until every queue is empty or `budget` seconds are spent;
        then the loop reads sockets again. Under load a read brings several frames per
        session, so one round per read would let queues grow."""
        self._pending = False
        self.ticks += 1
        started = time.perf_counter()
        self.lag = self._round(started)
        while (self._ready or self._batches) and time.perf_counter() - started < self.budget:
            self._round(started)
        if (self._ready or self._batches) and not self._pending:
            self._pending = True
            self._loop.call_soon(self._tick)
        self.flushes.ticked(time.perf_counter(), quiet=not self._pending)
        if self._after_tick:
            callbacks, self._after_tick = self._after_tick, []
            for callback in callbacks:
                callback()

    def flush_metrics(self) -> None:
        """Hand every observation so far to prometheus_client (a scrape of this process
        calls it first)."""
        self.flushes.flush()

    def _round(self, now: float) -> float:
        """One batched call per group over the ready streams; returns the age of the oldest
        frame it started. Each connection's replies of the round leave in one write at its end
        (server/cork.py; a tick's end would hold a reply up to `budget`: a client sending one
        frame per reply beside a long frame waited two ticks per frame)."""
        with CORK:
            oldest = now
            if self._batches:
                oldest = min(oldest, self._batches[0].received)
                self._advance_batches()
            groups: dict[tuple, list[Stream]] = {}
            taken: list[Stream] = []
            ready, piece = self._ready, self.piece
            for _ in range(min(len(ready), self.max_batch)):
                stream, _ = ready.popitem(last=False)
                queue = stream.queue
                while queue and type(queue[0]) is Control:
                    self.apply(stream, queue.popleft())
                if not queue or stream.sink is None or type(queue[0]) is Batch:
                    continue  # a batch at the head takes the stream along when it runs
                frame = queue[0]
                size = len(frame.samples)
                if frame.done == 0:
                    frame.t = stream.samples
                    oldest = min(oldest, frame.received)
                    # equal pieces of at most `piece` samples (short frames: one sample a round)
                    frame.piece = 1 if size <= STEPPED_FRAMES else -(-size // -(-size // piece))
                length = min(size - frame.done, frame.piece)
                groups.setdefault((stream.pool, stream.rate, length), []).append(stream)
                taken.append(stream)
            for (pool, rate, length), members in groups.items():
                if length == 1:
                    self._step_frames(pool, rate, members)
                else:
                    self._advance(pool, rate, length, members)
            for stream in taken:
                if stream.queue and stream.sink is not None:
                    ready[stream] = None
            return now - oldest

    def apply(self, stream: Stream, item: Control) -> None:
        """Run a control item now (its turn has come) and hand the result to the sink."""
        value: Any = None
        if item.kind == "reset":
            self.reset(stream)
            value = 0
        elif item.kind in ("snapshot", "end"):
            value = self.snapshot(stream)
        if stream.sink is not None:
            stream.sink.control_done(item, value)

    def _advance(self, pool: SlotPool, rate: float, length: int, members: list[Stream]) -> None:
        backend, model = pool.backend, self._models[pool]
        members.sort(key=lambda s: s.slot)  # consecutive rows gather as a view
        frames = [s.queue[0] for s in members]
        if length == 1:
            u = np.stack([f.samples[f.done] for f in frames])  # (B, d_input)
        else:
            u = np.stack([f.samples[f.done:f.done + length] for f in frames])  # (B, T, d_input)
        index = pool.index([s.slot for s in members])
        for stream, frame in zip(members, frames, strict=True):
            if frame.done == 0 and length < len(frame.samples):  # spans several ticks
                frame.before = pool.rows(stream.slot)
        started = time.perf_counter()
        try:
            flat32, flat64 = pool.gather(index)
            x = torch.from_numpy(u).to(backend.device)
            if length == 1:
                y, flat32, flat64 = backend.step_flat(x, flat32, flat64, rate)
                y = y[:, None]  # (B, 1, d_output)
            else:
                y, flat32, flat64 = backend.chunk_flat(x, flat32, flat64, rate)  # (B, T, d_out)
            y = y.to("cpu", torch.float32).numpy()
        except Exception as exc:  # the states were not written back: nothing is lost
            self._failed(members, frames, exc)
            return
        elapsed = time.perf_counter() - started
        # A frame whose inputs or outputs are not finite is rejected whole: its state row is
        # not written back (or, for a frame computed over several ticks, restored).
        rows = len(members)
        fine = np.isfinite(y.reshape(rows, -1)).all(1)
        if length == 1:
            fine &= np.isfinite(u.reshape(rows, -1)).all(1)
        self._write_back(pool, members, index, flat32, flat64, fine)
        model.call("step" if length == 1 else "chunk", elapsed, rows, length * int(fine.sum()))
        for stream, frame, out, ok in zip(members, frames, y, fine.tolist(), strict=True):
            if not ok:
                self._reject_non_finite(stream, frame)
                continue
            stream.samples += length
            frame.done += length
            if frame.done < len(frame.samples):
                if stream.output_last:
                    frame.pieces = [out[-1:]]
                else:
                    frame.pieces = [*(frame.pieces or ()), out]
                continue
            if frame.pieces:
                out = out[-1:] if stream.output_last else np.concatenate([*frame.pieces, out])
            elif stream.output_last:
                out = out[-1:]
            self._finish(stream)
            model.latencies.append(frame.received)
            stream.sink.frame_done(frame, out)

    def _failed(self, members: list[Stream], frames: list[Frame], exc: Exception) -> None:
        log.exception("batched call failed")
        for stream, frame in zip(members, frames, strict=True):
            self._finish(stream)
            stream.sink.frame_failed(frame, exc)

    @staticmethod
    def _write_back(pool: SlotPool, members: list[Stream], index, flat32: torch.Tensor,
                    flat64: torch.Tensor, fine: np.ndarray | None) -> None:
        """The new state rows into the pool: all of them (fine None, or all True), or only
        those of frames whose inputs and outputs were finite."""
        if fine is None or fine.all():
            pool.scatter(index, flat32, flat64)
            return
        device = pool.backend.device
        keep = torch.from_numpy(np.flatnonzero(fine)).to(device)
        slots = torch.tensor([s.slot for s in members], device=device)[keep]
        pool.scatter(slots, flat32[keep], flat64[keep])

    def _reject_non_finite(self, stream: Stream, frame: Frame) -> None:
        if frame.before is not None:  # earlier pieces were applied: undo them
            stream.pool.restore(stream.slot, frame.before)
            stream.samples -= frame.done
        self._finish(stream)
        error = ServeError("non_finite", "inputs contain NaN or Inf, or the outputs would "
                           "not be finite; the frame was not applied")
        stream.sink.control_done(Control("error", error, frame.seq, frame.entry), None)

    def _finish(self, stream: Stream, count: int = 1) -> None:
        """The head frame (or `count` head frames) leaves the queue, answered or rejected."""
        queue, size = stream.queue, 0
        for _ in range(count):
            size += queue.popleft().samples.nbytes
        model = self._models[stream.pool]
        model.queued -= count
        model.queued_bytes -= size
        stream.queued_bytes -= size
