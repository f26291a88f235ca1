"""The multiplexed side of the scheduler: batches of one-sample frames of many sessions
(one /mux data message), queued on each member's stream and stepped together once the batch
reaches the head of every member's queue; answered in one callback, with no per-member
objects."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from server.slots import SlotPool
from server.work import BATCH_FAILED, BATCH_GONE, BATCH_NON_FINITE, BATCH_OK, Batch, Stream

log = logging.getLogger("s4serve.scheduler")


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

    def _advance_batches(self) -> None:
        """Step every batch member whose turn has come, one call per (model, rate); answer
        the batches that are complete."""
        groups: dict[tuple, list[tuple[Batch, np.ndarray]]] = {}
        for batch in self._batches:
            first = int(batch.waiting.argmax())
            probe = batch.streams[first]
            if probe.epoch == batch.epochs[first] and probe.queue[0] is not batch:
                continue  # in step with the probe, the others are behind earlier items too
            due = np.zeros(len(batch.streams), bool)
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
            streams = [batch.streams[i] for batch, due in members
                       for i in np.flatnonzero(due).tolist()]
            u = np.concatenate([batch.u[due] for batch, due in members])
            y, status = self._step_rows(pool, rate, streams, u)
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
            for stream in streams:
                stream.queue.popleft()
                if stream.queue and type(stream.queue[0]) is not Batch:
                    ready[stream] = None
        if any(batch.left == 0 for batch in self._batches):
            finished = [batch for batch in self._batches if batch.left == 0]
            self._batches = [batch for batch in self._batches if batch.left]
            for batch in finished:
                batch.sink.batch_done(batch, batch.outputs, batch.status)

    def _step_rows(self, pool: SlotPool, rate: float, streams: list[Stream],
                   u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step of `streams` on inputs u (B, d_input): (outputs, BATCH_* per row)."""
        backend, model = pool.backend, self._models[pool]
        slots = np.fromiter((s.slot for s in streams), np.int64, len(streams))
        # in slot order: sessions opened together hold consecutive rows, which gather as a
        # view and scatter as one plain copy instead of two indexed passes
        order = np.argsort(slots, kind="stable")
        rows = slots[order]
        index = pool.index(rows.tolist())
        started = time.perf_counter()
        try:
            flat32, flat64 = pool.gather(index)
            x = torch.from_numpy(u[order]).to(backend.device)
            y_sorted, flat32, flat64 = backend.step_flat(x, flat32, flat64, rate)
            y_sorted = y_sorted.to("cpu", torch.float32).numpy()
        except Exception:  # the states were not written back: nothing is lost
            log.exception("batched call failed")
            return (np.zeros((len(u), backend.info.d_output), np.float32),
                    np.full(len(u), BATCH_FAILED, np.uint8))
        elapsed = time.perf_counter() - started
        fine_sorted = np.isfinite(y_sorted).all(1)
        if fine_sorted.all():
            pool.scatter(index, flat32, flat64)
        else:
            keep = np.flatnonzero(fine_sorted)
            pool.scatter(torch.from_numpy(rows[keep]).to(backend.device), flat32[keep],
                         flat64[keep])
        y = np.empty_like(y_sorted)
        y[order] = y_sorted
        fine = np.empty_like(fine_sorted)
        fine[order] = fine_sorted
        for stream, ok in zip(streams, fine.tolist(), strict=True):
            if ok:
                stream.samples += 1
        model.call("step", elapsed, len(streams), int(fine.sum()))
        return y, np.where(fine, BATCH_OK, BATCH_NON_FINITE).astype(np.uint8)
