"""The multiplexed side of the scheduler: batches of one-sample frames of many sessions
(one /mux data message), queued on each member's stream and stepped together once the batch
reaches the head of every member's queue; answered in one callback, with no per-member
objects.

The common message skips all of that: when none of its members has anything queued (its
connection has nothing in flight) and the pool is stepped in place, `step_message` steps it
at once, from the message's bytes into the reply's records by a call prepared once for those
sessions, and the connection answers it in the same callback. Measured (1 worker, 5 connections x
100 sessions at 100 Hz, per 100-entry message): queueing it cost ~170 us in appends, head
checks and pops, and a tick; the step itself ~480 us."""

from __future__ import annotations

import logging
import time
from collections import deque
from itertools import compress

import numpy as np
import torch

from server.slots import SlotPool
from server.work import BATCH_FAILED, BATCH_GONE, BATCH_NON_FINITE, BATCH_OK, Batch, Stream

log = logging.getLogger("s4serve.scheduler")
# A batch whose members' rows are not consecutive has them moved into one run of rows, once:
# its later steps then gather a view and scatter one plain copy instead of two indexed copies
# (measured at B=100: the indexed pair ~270 us, the plain copy ~95 us, of a ~700 us step).
# A member moved less than SETTLE_S ago stays put (overlapping batches would move rows back
# and forth); a pool without a free run is not searched again for RETRY_S.
SETTLE_S = 1.0
RETRY_S = 1.0


def _run(slots: np.ndarray) -> bool:
    """Consecutive and ascending."""
    return bool(slots[-1] - slots[0] == len(slots) - 1 and (np.diff(slots) == 1).all())


class BatchRounds:
    """Mixed into `Scheduler` (server/scheduler.py), whose state it shares: `_batches`,
    `_models`, `_ready`, `_wake`."""

    def submit_batch(self, batch: Batch) -> None:
        """Queue a batch behind each member's earlier items; members must be distinct."""
        n = len(batch.streams)
        batch.epochs = [stream.epoch for stream in batch.streams]
        batch.waiting, batch.left = np.ones(n, bool), n
        batch.outputs = np.zeros((n, batch.pool.backend.info.d_output), np.float32)
        batch.status = np.full(n, BATCH_GONE, np.uint8)
        for stream in batch.streams:
            stream.queue.append(batch)
        self._models[batch.pool].queued += n
        self._batches.append(batch)
        self._wake()

    def step_message(self, pool: SlotPool, call, sessions: int, data: bytes, offset: int,
                     stride: int, received: float) -> int | None:
        """One step of `sessions` streams now, by a prepared rows call (`ModelBackend.rows_call`,
        which writes their outputs and flags and counts their samples) on inputs read from
        `data` where they lie; observed as a round would. For members with nothing queued, so
        that nothing is overtaken. Returns how many advanced (-1: the call failed and none
        did; None: `data`'s records are not the ones the call was prepared for, and nothing
        happened)."""
        model, started = self._models[pool], time.perf_counter()
        try:
            done = call(data, offset, stride)
        except Exception:  # the states were not written: nothing is lost
            log.exception("batched call failed")
            now = time.perf_counter()
            model.message(now - received, 0)  # answered too (every entry `internal`)
            self.flushes.ticked(now, quiet=not self._pending)
            return -1
        if done is None:
            return None
        now = time.perf_counter()
        model.call("step", now - started, sessions, done)
        model.message(now - received, done)
        self.flushes.ticked(now, quiet=not self._pending)
        return done

    def _run_of(self, batch: Batch) -> np.ndarray | None:
        """The rows of the batch's members if they are one ascending run, in batch order;
        moved into one first when they are not and may move (see SETTLE_S); else None."""
        streams, pool = batch.streams, batch.pool
        n = len(streams)
        slots = np.fromiter((s.slot for s in streams), np.int64, n)
        if _run(slots):
            return slots
        now = time.monotonic()
        if now < self._no_run_until.get(pool, 0.0) or any(
                now - s.placed < SETTLE_S for s in streams):
            return None
        first = pool.allocate_run(n)
        if first is None:
            self._no_run_until[pool] = now + RETRY_S
            return None
        pool.move(slots.tolist(), first)
        for i, stream in enumerate(streams):
            stream.slot, stream.placed = first + i, now
        return np.arange(first, first + n)

    def _advance_batches(self) -> None:
        """Step every batch member whose turn has come, one call per (model, rate); answer
        the batches that are complete."""
        groups: dict[tuple, list[tuple[Batch, np.ndarray]]] = {}
        for batch in self._batches:
            streams = batch.streams
            if batch.left == len(streams) and [s.epoch for s in streams] == batch.epochs:
                # none stepped or dropped (the usual case): due when at the head of every queue
                if all(s.queue[0] is batch for s in streams):
                    groups.setdefault((batch.pool, batch.rate), []).append(
                        (batch, np.ones(len(streams), bool)))
                continue
            first = int(batch.waiting.argmax())
            probe = streams[first]
            if probe.epoch == batch.epochs[first] and probe.queue[0] is not batch:
                continue  # in step with the probe, the others are behind earlier items too
            due = np.zeros(len(streams), bool)
            for i in np.flatnonzero(batch.waiting).tolist():
                stream = batch.streams[i]
                if stream.epoch != batch.epochs[i]:  # dropped: left out
                    batch.waiting[i] = False
                    batch.left -= 1
                elif stream.queue[0] is batch:
                    due[i] = True
            if due.any():
                groups.setdefault((batch.pool, batch.rate), []).append((batch, due))
        for (pool, rate), members in groups.items():
            if pool.in_place:  # rows stepped where they lie: every due member in one call
                self._step_members(pool, rate, members)
                continue
            rest = []  # a whole batch on a run of rows steps alone: its rows are a view
            for batch, due in members:
                run = self._run_of(batch) if due.all() else None
                if run is not None:
                    self._step_members(pool, rate, [(batch, due)], run)
                else:
                    rest.append((batch, due))
            if rest:
                self._step_members(pool, rate, rest)
        if any(batch.left == 0 for batch in self._batches):
            finished = [batch for batch in self._batches if batch.left == 0]
            self._batches = [batch for batch in self._batches if batch.left]
            for batch in finished:
                batch.sink.batch_done(batch, batch.outputs, batch.status)

    def _step_members(self, pool: SlotPool, rate: float, members: list[tuple[Batch, np.ndarray]],
                      run: np.ndarray | None = None) -> None:
        """One step of the due members of some batches; their results into the batches."""
        if len(members) == 1 and members[0][1].all():
            streams, u = members[0][0].streams, members[0][0].u
        else:
            streams = [batch.streams[i] for batch, due in members
                       for i in np.flatnonzero(due).tolist()]
            u = np.concatenate([batch.u[due] for batch, due in members])
        y, status = self._step_rows(pool, rate, streams, u, run)
        model, ready, at = self._models[pool], self._ready, 0
        model.queued -= len(streams)
        for batch, due in members:
            n = int(due.sum())
            batch.outputs[due], batch.status[due] = y[at:at + n], status[at:at + n]
            batch.waiting[due] = False
            batch.left -= n
            answered = int((status[at:at + n] == BATCH_OK).sum())
            model.latencies.extend([batch.received] * answered)
            at += n
        queues = [stream.queue for stream in streams]
        for _ in map(deque.popleft, queues):
            pass
        if any(queues):  # some have more queued: a frame or control item makes them ready
            for stream, queue in zip(streams, queues, strict=True):
                if queue and type(queue[0]) is not Batch:
                    ready[stream] = None

    def _step_rows(self, pool: SlotPool, rate: float, streams: list[Stream], u: np.ndarray,
                   run: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One step of `streams` on inputs u (B, d_input): (outputs, BATCH_* per row). `run`:
        their rows, known to be one ascending run (a view, no permutation)."""
        backend, model = pool.backend, self._models[pool]
        if run is not None:
            order, rows, index = None, run, slice(int(run[0]), int(run[-1]) + 1)
        elif pool.in_place:  # stepped where they lie: in batch order
            order = None
            rows = np.fromiter((s.slot for s in streams), np.int64, len(streams))
        else:  # in slot order: consecutive rows gather as a view
            slots = np.fromiter((s.slot for s in streams), np.int64, len(streams))
            order = np.argsort(slots, kind="stable")
            rows = slots[order]
            index = pool.index(rows.tolist())
        started = time.perf_counter()
        try:
            if pool.in_place:  # rows with a non-finite input or output are left as they were
                y_sorted = np.empty((len(u), backend.info.d_output), np.float32)
                kept = np.empty(len(u), np.uint8)
                backend.step_rows_into(u, pool.flat32, pool.flat64, rows, rate, y_sorted, kept)
                fine_sorted = kept.view(bool)
            else:
                x = torch.from_numpy(u if order is None else u[order]).to(backend.device)
                flat32, flat64 = pool.gather(index)
                y_sorted, flat32, flat64 = backend.step_flat(x, flat32, flat64, rate)
                y_sorted = y_sorted.to("cpu", torch.float32).numpy()
        except Exception:  # the states were not written back: nothing is lost
            log.exception("batched call failed")
            return (np.zeros((len(u), backend.info.d_output), np.float32),
                    np.full(len(u), BATCH_FAILED, np.uint8))
        elapsed = time.perf_counter() - started
        if not pool.in_place:  # (in place: written back in the call, finite rows only)
            fine_sorted = np.isfinite(y_sorted).all(1)
            if fine_sorted.all():
                pool.scatter(index, flat32, flat64)
            else:
                keep = np.flatnonzero(fine_sorted)
                pool.scatter(torch.from_numpy(rows[keep]).to(backend.device), flat32[keep],
                             flat64[keep])
        if order is None:
            y, fine = y_sorted, fine_sorted
        else:
            y = np.empty_like(y_sorted)
            y[order] = y_sorted
            fine = np.empty_like(fine_sorted)
            fine[order] = fine_sorted
        for stream in streams if fine.all() else compress(streams, fine):
            stream.samples += 1
        model.call("step", elapsed, len(streams), int(fine.sum()))
        return y, np.where(fine, BATCH_OK, BATCH_NON_FINITE).astype(np.uint8)
