"""The step scheduler: one compute thread advances many sessions per batched call.

Each session (a `Stream`) has a FIFO of operations. Every tick the compute thread takes the
head operation of each ready stream (at most `max_batch` of them), runs control operations
(load, reset, snapshot, release) directly, and advances the frames in one call per group:
per-sample frames of one (model, rate) as one batched `step`, multi-sample frames of one
(model, rate, T) as one batched `chunk`. Whether a frame goes through `step` or `chunk` depends
only on its own length, never on what other sessions do, so batching cannot change a session's
numbers. Results go back to the event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from server.metrics import Metrics
from server.slots import SlotPool

log = logging.getLogger("s4serve.scheduler")


@dataclass
class FrameResult:
    outputs: np.ndarray  # (T or 1, d_output) float32
    t: int  # index of the frame's first sample in the session


@dataclass
class Op:
    kind: str  # "frame" | "load" | "reset" | "snapshot" | "release"
    payload: Any
    future: asyncio.Future


@dataclass(eq=False)
class Stream:
    """The compute-side half of a session: where its state lives and what it waits for."""

    pool: SlotPool
    slot: int
    rate: float
    output_last: bool
    samples: int = 0
    ops: deque[Op] = field(default_factory=deque)
    queued: Any = None  # this model's queue-depth gauge, resolved once


    @property
    def model(self) -> str:
        return self.pool.backend.info.name


class Scheduler:
    def __init__(self, metrics: Metrics, max_batch: int = 1024, tick: float = 0.0) -> None:
        self.metrics = metrics
        self.max_batch = max_batch
        self.tick = tick
        self._ready: OrderedDict[Stream, None] = OrderedDict()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----- event-loop side -------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="s4serve-compute", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def open(
        self, pool: SlotPool, rate: float, output_last: bool, state: list[np.ndarray] | None,
        samples: int = 0,
    ) -> Stream | None:
        """A stream in a fresh slot (None when the pool is full); its first op loads the state."""
        slot = pool.allocate()
        if slot is None:
            return None
        stream = Stream(pool=pool, slot=slot, rate=rate, output_last=output_last)
        stream.queued = self.metrics.queue_depth.labels(stream.model)
        self.submit(stream, "load", (state, samples))
        return stream

    def submit(self, stream: Stream, kind: str, payload: Any = None) -> asyncio.Future:
        assert self._loop is not None, "scheduler not started"
        future = self._loop.create_future()
        with self._cond:
            stream.ops.append(Op(kind, payload, future))
            self._ready[stream] = None
            self._cond.notify()
        if kind == "frame":
            stream.queued.inc()
        return future

    # ----- compute thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            if self.tick:
                time.sleep(self.tick)
            taken = self._take()
            results = self._process(taken)
            if results:
                self._loop.call_soon_threadsafe(_deliver, results)

    def _take(self) -> list[tuple[Stream, Op]]:
        taken = []
        with self._cond:
            for _ in range(min(len(self._ready), self.max_batch)):
                stream, _ = self._ready.popitem(last=False)
                taken.append((stream, stream.ops.popleft()))
                if stream.ops:  # back of the line: every ready session gets its turn
                    self._ready[stream] = None
        return taken

    def _process(self, taken: list[tuple[Stream, Op]]) -> list[tuple[asyncio.Future, Any, bool]]:
        results: list[tuple[asyncio.Future, Any, bool]] = []
        groups: dict[tuple, list[tuple[Stream, Op]]] = defaultdict(list)
        for stream, op in taken:
            if op.kind == "frame":
                stream.queued.dec()
                length = op.payload.shape[0]
                groups[(id(stream.pool), stream.rate, length)].append((stream, op))
                continue
            try:
                results.append((op.future, self._control(stream, op), False))
            except Exception as exc:  # reported to that session only
                log.exception("control operation %s failed", op.kind)
                results.append((op.future, exc, True))
        for members in groups.values():
            try:
                outcome = self._advance(members)
                results.extend(
                    (op.future, r, False) for (_, op), r in zip(members, outcome, strict=True)
                )
            except Exception as exc:  # the states were not written back: nothing is lost
                log.exception("batched call failed")
                results.extend((op.future, exc, True) for _, op in members)
        return results

    def _control(self, stream: Stream, op: Op) -> Any:
        pool, slot = stream.pool, stream.slot
        if op.kind == "load":
            arrays, samples = op.payload
            if arrays is None:
                pool.zero(slot)
            else:
                pool.load(slot, arrays)
            stream.samples = samples
            return samples
        if op.kind == "reset":
            pool.zero(slot)
            stream.samples = 0
            return 0
        if op.kind == "snapshot":
            return stream.samples, pool.read(slot)
        if op.kind == "release":
            snapshot = stream.samples, pool.read(slot)
            pool.free(slot)
            return snapshot
        raise ValueError(f"unknown operation {op.kind!r}")

    def _advance(self, members: list[tuple[Stream, Op]]) -> list[FrameResult]:
        first = members[0][0]
        pool, backend, rate = first.pool, first.pool.backend, first.rate
        model = backend.info.name
        length = members[0][1].payload.shape[0]
        index = pool.index([s.slot for s, _ in members])
        u = torch.from_numpy(np.stack([op.payload for _, op in members])).to(backend.device)
        state = pool.gather(index)
        started = time.perf_counter()
        if length == 1:
            y, state = backend.step(u[:, 0], state, rate)
            y = y[:, None]
            kind = "step"
        else:
            y, state = backend.chunk(u, state, rate)
            kind = "chunk"
        pool.scatter(index, state)
        y = y.to("cpu", torch.float32).numpy()
        self.metrics.step_seconds.labels(model, kind).observe(time.perf_counter() - started)
        self.metrics.step_batch_size.labels(model).observe(len(members))
        self.metrics.samples.labels(model, "stream").inc(length * len(members))
        out = []
        for row, (stream, _) in zip(y, members, strict=True):
            out.append(FrameResult(row[-1:] if stream.output_last else row, stream.samples))
            stream.samples += length
        return out


def _deliver(results: list[tuple[asyncio.Future, Any, bool]]) -> None:
    for future, value, failed in results:
        if future.done():  # the connection went away; the work still counted
            continue
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)
