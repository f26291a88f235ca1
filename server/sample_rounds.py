"""The per-sample side of the scheduler: one-sample pieces of many sessions in one batched
step per (model, rate). On a pool stepped where its rows lie (the native step), a session's
queued one-sample frames go as one block: under load a session has several queued by the time
its turn comes, and a round then costs one pass per session instead of one per frame, and,
with the cork (server/cork.py), one socket write. Measured (2 workers, 1000 per-sample
sessions at 100 Hz, session 20): server CPU per answered frame 36-44 us -> 20-23 us, the same
as the bare echo's on that load."""

from __future__ import annotations

import time
from itertools import islice

import numpy as np
import torch

from server.slots import SlotPool
from server.work import Frame, Stream


def _block(stream: Stream, most: int) -> int:
    """How many head items of the stream, at most `most`, are untouched one-sample frames
    (at least 1: the head frame, which may be longer and partly done)."""
    if stream.careful:
        stream.careful -= 1
        return 1
    queue, k = stream.queue, 1
    if len(queue) == 1 or len(queue[0].samples) != 1 or queue[0].done:
        return 1
    for item in islice(queue, 1, most):
        if type(item) is not Frame or len(item.samples) != 1:
            break
        k += 1
    return k


class SampleRounds:
    """Mixed into `Scheduler` (server/scheduler.py), whose state and helpers it shares:
    `_models`, `_failed`, `_finish`, `_reject_non_finite`, `_write_back`."""

    def _step_frames(self, pool: SlotPool, rate: float, members: list[Stream]) -> None:
        """The per-sample path: one sample of each member's head frame in one batched step.
        What `_advance` does for a piece of length 1, with the least work per frame."""
        if pool.in_place:
            self._step_blocks(pool, rate, members)
            return
        backend, model = pool.backend, self._models[pool]
        members.sort(key=lambda stream: stream.slot)  # consecutive rows gather as a view
        frames = [s.queue[0] for s in members]
        u = np.stack([f.samples[f.done] for f in frames])  # (B, d_input)
        index = pool.index([s.slot for s in members])
        for stream, frame in zip(members, frames, strict=True):
            if frame.done == 0 and len(frame.samples) > 1:  # a short frame spans a few rounds
                frame.before = pool.rows(stream.slot)
        started = time.perf_counter()
        try:
            x = torch.from_numpy(u) if pool.on_cpu else torch.from_numpy(u).to(backend.device)
            y, flat32, flat64 = backend.step_flat(x, *pool.gather(index), rate)
            if not pool.on_cpu or y.dtype != torch.float32:
                y = y.to("cpu", torch.float32)
            y = y.numpy()  # (B, d_output) float32
        except Exception as exc:  # the states were not written back: nothing is lost
            self._failed(members, frames, exc)
            return
        elapsed = time.perf_counter() - started
        fine = None  # the usual case, checked at once: every input and output finite
        if not (np.isfinite(y).all() and np.isfinite(u).all()):
            fine = np.isfinite(y).all(1) & np.isfinite(u).all(1)
        self._write_back(pool, members, index, flat32, flat64, fine)
        model.call("step", elapsed, len(members), len(members) if fine is None else
                   int(fine.sum()))
        for i, (stream, frame) in enumerate(zip(members, frames, strict=True)):
            if fine is not None and not fine[i]:
                self._reject_non_finite(stream, frame)
            else:
                self._one_sample(stream, frame, y[i:i + 1])

    def _one_sample(self, stream: Stream, frame: Frame, out: np.ndarray) -> None:
        """The head frame advanced by one sample (out: (1, d_output)); answered when whole."""
        stream.samples += 1
        done = frame.done = frame.done + 1
        if done < len(frame.samples):
            frame.pieces = [out] if stream.output_last else [*(frame.pieces or ()), out]
            return
        if frame.pieces:
            out = out if stream.output_last else np.concatenate([*frame.pieces, out])
        self._finish(stream)
        self._models[stream.pool].latencies.append(frame.received)
        stream.sink.frame_done(frame, out)

    def _step_blocks(self, pool: SlotPool, rate: float, members: list[Stream]) -> None:
        """The per-sample path on rows stepped where they lie: each member's queued
        one-sample frames (up to the backend's `block_steps`: the native step keeps blocks of
        up to 32 samples in float32 at every sample, bit for bit their single steps) as one
        block, all members in one call, answered together (one socket write per session with
        the cork). Under load a session has several such frames queued, and a round then
        costs one pass per session rather than per frame; a frame of 2-4 samples still
        advances one sample a round. A block refused for a non-finite value is retried frame
        by frame, so that only the bad frame is refused."""
        backend, model = pool.backend, self._models[pool]
        counts = [_block(stream, backend.block_steps) for stream in members]
        most, n = max(counts), len(members)
        rows = np.fromiter((s.slot for s in members), np.int64, n)
        heads = [s.queue[0] for s in members]
        for stream, head in zip(members, heads, strict=True):
            if head.done == 0 and len(head.samples) > 1:  # spans a few rounds
                head.before = pool.rows(stream.slot)
        if most == 1:  # the usual light load: one call of single steps (tiled in C)
            u, steps = np.stack([f.samples[f.done] for f in heads]), None  # (B, d_input)
        else:
            u = np.zeros((n, most, backend.info.d_input), np.float32)  # (B, K, d_input)
            for i, (stream, head, k) in enumerate(zip(members, heads, counts, strict=True)):
                u[i, :k] = (head.samples[head.done:head.done + 1] if k == 1 else
                            np.concatenate([stream.queue[j].samples for j in range(k)]))
            steps = np.array(counts, np.int64)
        y = np.empty((*u.shape[:-1], backend.info.d_output), np.float32)
        kept = np.empty(n, np.uint8)
        started = time.perf_counter()
        try:
            backend.step_rows_into(u, pool.flat32, pool.flat64, rows, rate, y, kept, steps)
        except Exception as exc:  # no row was written: nothing is lost
            self._failed(members, heads, exc)
            return
        elapsed = time.perf_counter() - started
        model.call("step", elapsed, n, int(np.dot(kept, counts)))
        blocks = y if steps is not None else y[:, None]  # (B, K, d_output)
        for i, (stream, head, k) in enumerate(zip(members, heads, counts, strict=True)):
            if not kept[i]:
                if k > 1:
                    stream.careful = k  # each of them alone: only a bad one is refused
                else:
                    self._reject_non_finite(stream, head)
            elif k == 1:
                self._one_sample(stream, head, blocks[i, :1])
            else:
                self._answer_block(stream, k, blocks[i, :k])

    def _answer_block(self, stream: Stream, k: int, outputs: np.ndarray) -> None:
        """k one-sample head frames applied (outputs (k, d_output)): all bookkeeping first,
        then one call to the sink."""
        frames, t = list(islice(stream.queue, k)), stream.samples
        for j, frame in enumerate(frames):
            frame.t, frame.done = t + j, 1
        stream.samples = t + k
        self._finish(stream, k)
        self._models[stream.pool].latencies.extend([frame.received for frame in frames])
        stream.sink.frames_done(frames, outputs)
