"""Checkpoints of live sessions, so that a process killed without warning (SIGKILL, OOM, a lost
node) loses at most `checkpoint_interval` seconds of each session, which the client replays.

Every interval, each live session that advanced by at least `checkpoint_samples` has its state
written to the session store, as the record a detach would write (marked live). The state is
taken on a frame boundary (a frame computed over several ticks counts from its start), so that
`samples` on resume is always where a frame began. A pass runs on the event loop between
ticks, in slices of `SLICE` sessions (one indexed copy of their state rows, their blobs cut
from those rows at once, one store round trip), so a session's state is never read while a
tick changes it and streams wait at most one slice. A write the store refuses means another
process took the session over: this one lets it go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from server.scheduler import Frame
from server.sessions import Session, SessionManager
from server.state_blob import BlobWriter
from server.store import RowBatch

log = logging.getLogger("s4serve.checkpoints")
SLICE = 256


def boundary(session: Session) -> tuple[int, tuple | None]:
    """(samples, saved rows or None) at the last frame boundary: a frame in progress is
    counted from its start, with the rows saved before it."""
    stream = session.stream
    head = stream.queue[0] if stream.queue else None
    if type(head) is Frame and head.done and head.before is not None:
        return stream.samples - head.done, head.before
    return stream.samples, None


class Checkpointer:
    def __init__(self, manager: SessionManager, interval: float, min_samples: int = 1) -> None:
        self.manager = manager
        self.interval = interval
        self.min_samples = min_samples
        self._writers: dict[tuple[str, str], BlobWriter] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="s4serve-checkpoints")

    def close(self) -> None:
        """Wait for the write in flight (a drain's detaches wait for it too)."""
        self._thread.shutdown(wait=True)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.checkpoint()
            except Exception:
                log.exception("checkpoint pass failed")

    def due(self) -> list[Session]:
        """Live sessions that advanced, and those whose checkpoint would expire in the store
        within the next passes (a quiet session must stay resumable after a SIGKILL too)."""
        stale = time.monotonic() - self.manager.resume_ttl / 2
        return [s for s in self.manager.live.values()
                if s.owner is not None and s.stream.sink is not None
                and (abs(boundary(s)[0] - s.checkpointed) >= self.min_samples
                     or (s.stored and s.written_at < stale))]

    async def checkpoint(self) -> int:
        """One pass over every due session; returns how many were written."""
        started, written = time.thread_time(), 0
        due = self.due()
        busy = time.thread_time() - started
        for at in range(0, len(due), SLICE):
            if at:
                await asyncio.sleep(0)  # let ticks and reads run between slices
            started = time.thread_time()
            live = self.manager.live
            sessions = [s for s in due[at:at + SLICE] if live.get(s.token) is s]
            batches = self._records(sessions)
            busy += time.thread_time() - started
            if batches:
                done, store_s = await self._store([batch for batch, _ in batches])
                items = [item for batch, _ in batches for item in batch.items]
                order = [session for _, members in batches for session in members]
                written += self._settled(order, items, done)
                busy += store_s
        # the pass's own work, without the ticks that ran between its slices: what it costs
        self.manager.metrics.checkpoint_seconds.observe(busy)
        return written

    def _writer(self, session: Session) -> BlobWriter:
        info = session.model.info
        key = (info.name, info.version)
        if key not in self._writers:
            self._writers[key] = BlobWriter(info.name, info.version, session.stream.pool.layout,
                                            self.manager.secret)
        return self._writers[key]

    def _records(self, sessions: list[Session]) -> list[tuple[RowBatch, list[Session]]]:
        """The sessions' records, their state taken now (on the loop): a batch per model (and
        its sessions, in its order), its blobs cut from one indexed copy of their state rows."""
        if not sessions:
            return []
        manager = self.manager
        points = [boundary(s) for s in sessions]
        by_pool: dict = {}
        for i, session in enumerate(sessions):
            by_pool.setdefault(session.stream.pool, []).append(i)
        batches = []
        for pool, members in by_pool.items():
            index = torch.tensor([sessions[i].stream.slot for i in members], dtype=torch.long,
                                 device=pool.flat32.device)
            flat32 = pool.flat32.index_select(0, index)  # (B, W32)
            flat64 = pool.flat64.index_select(0, index)  # (B, W64)
            for row, i in enumerate(members):
                saved = points[i][1]
                if saved is not None:  # mid-frame: the rows from before the frame
                    flat32[row].copy_(saved[0])
                    flat64[row].copy_(saved[1])
            heads, parts, tails = self._writer(sessions[members[0]]).blob_rows(
                [points[i][0] for i in members], [sessions[i].sample_rate for i in members],
                flat32.cpu().numpy(), flat64.cpu().numpy())
            items = [(sessions[i].token,
                      manager.record(sessions[i], points[i][0], live=True, blob=b""),
                      sessions[i].epoch) for i in members]
            batches.append((RowBatch(items, heads, parts, tails), [sessions[i] for i in members]))
        for session in sessions:
            session.stored = True  # an end from now on forgets the record this write leaves
        return batches

    async def _store(self, batches: list[RowBatch]) -> tuple[list[bool], float]:
        """The store's answers for the batches' records, written by the writer thread; and
        the thread's CPU seconds for it (its wall time also counts waits for the GIL and the
        disk)."""
        store, ttl = self.manager.store, self.manager.resume_ttl

        def put() -> tuple[list[bool], float]:
            began = time.thread_time()
            done = [ok for batch in batches for ok in store.put_rows(batch, ttl)]
            return done, time.thread_time() - began

        future = self._thread.submit(put)
        self.manager.writing(future)
        return await asyncio.wrap_future(future)

    def _settled(self, sessions: list[Session], items: list[tuple], results: list[bool]) -> int:
        manager = self.manager
        written = 0
        for session, (_, record, _), ok in zip(sessions, items, results, strict=True):
            samples = record.samples
            if ok:
                session.checkpointed, session.stored = samples, True
                session.written_at = time.monotonic()
                written += 1
            elif manager.live.get(session.token) is session:
                log.warning("session %s was taken over elsewhere: letting it go", session.id)
                manager.fenced(session)
        counter = manager.metrics.checkpoints
        counter.labels("written").inc(written)
        counter.labels("fenced").inc(len(sessions) - written)
        return written
