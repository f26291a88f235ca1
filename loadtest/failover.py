"""A replica lost under live streams: sessions stream through a `Cluster` (nginx, Redis, N
replicas) with the client library, the replica holding the most sessions gets `stop`
(SIGKILL or SIGTERM) mid-stream, and every session runs to its end. Returns what each session
saw (its outputs, reconnects, samples replayed, the longest wait between two outputs) for the
test to check against `predict` and the benchmark to summarise."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import numpy as np

from client import AsyncClient
from loadtest.cluster import Cluster, metric


@dataclass
class SessionRun:
    outputs: np.ndarray  # (samples or frames, d_output) as the caller got them
    reconnects: int
    replayed: int  # samples sent again after a resume
    longest_gap_s: float  # the longest wait between two consecutive outputs


@dataclass
class FailoverRun:
    sessions: list[SessionRun]
    expected: np.ndarray  # predict over every session's whole input
    victim_sessions: int  # sessions the stopped replica held
    resumed_elsewhere: int  # sessions opened or resumed on the others after the stop
    stop_at: float  # monotonic time of the signal


async def _stream(client: AsyncClient, model: str, u: np.ndarray, frame: int, pace_s: float,
                  going: asyncio.Event) -> SessionRun:
    out, last, gap = [], None, 0.0
    async with client.stream(model, checkpoint_s=60.0) as s:
        for i in range(0, len(u), frame):
            out.append(await s.send(u[i:i + frame]))
            now = time.monotonic()
            gap, last = max(gap, now - last) if last is not None else 0.0, now
            if i >= 10 * frame:
                going.set()
            await asyncio.sleep(pace_s)
        run = SessionRun(np.concatenate(out), s.reconnects, s.replayed, gap)
    return run


async def run_failover(cluster: Cluster, model: str, inputs: np.ndarray, frame: int,
                       pace_s: float, stop: signal.Signals = signal.SIGKILL,
                       settle_s: float = 0.5) -> FailoverRun:
    """`inputs` (sessions, L, d_input); `settle_s` after every session is streaming (past a
    checkpoint of each) the victim gets `stop`."""
    label = f'model="{model}"'
    async with AsyncClient(cluster.url) as client:
        going = [asyncio.Event() for _ in inputs]
        tasks = [asyncio.create_task(_stream(client, model, u, frame, pace_s, e))
                 for u, e in zip(inputs, going, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in going)), 120)
        await asyncio.sleep(settle_s)
        urls = [r.url for r in cluster.replicas]
        counts = [metric(url, "s4serve_sessions_active", label) for url in urls]
        opened = [metric(url, "s4serve_sessions_opened_total", label) for url in urls]
        victim = int(np.argmax(counts))
        stop_at = time.monotonic()
        cluster.replicas[victim].proc.send_signal(stop)
        sessions = await asyncio.wait_for(asyncio.gather(*tasks), 180)
        expected = (await client.predict(model, inputs)).outputs
    cluster.replicas[victim].proc.wait(60)
    resumed = sum(metric(url, "s4serve_sessions_opened_total", label) - opened[i]
                  for i, url in enumerate(urls) if i != victim)
    return FailoverRun(sessions, expected, int(counts[victim]), int(resumed), stop_at)
