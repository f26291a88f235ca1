"""200 concurrent sessions with interleaved per-sample frames: batching happens, and every
session's outputs equal its solo outputs."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np

from tests.server.client import connect, predict, start

SESSIONS, LENGTH = 200, 12


def batch_histogram(server) -> dict[float, float]:
    text = httpx.get(server.url + "/metrics").text
    pattern = r's4serve_step_batch_size_bucket\{le="([^"]+)",model="seq"\} (\S+)'
    return {float(le): float(n) for le, n in re.findall(pattern, text)}


async def run_session(server, u: np.ndarray, barrier: asyncio.Barrier | None) -> np.ndarray:
    async with await connect(server.ws_url, "seq") as ws:
        await start(ws)
        if barrier is not None:
            await barrier.wait()
        outputs = []
        for t in range(len(u)):  # one frame, one reply: sessions interleave sample by sample
            await ws.send(u[t : t + 1].tobytes())
            outputs.append(np.frombuffer(await ws.recv(), "<f4"))
        return np.stack(outputs)


async def test_200_sessions_batch_and_match_solo(server):
    rng = np.random.default_rng(31)
    inputs = rng.standard_normal((SESSIONS, LENGTH, 2)).astype(np.float32)
    solo = [await run_session(server, inputs[i], None) for i in range(3)]
    before = batch_histogram(server)
    barrier = asyncio.Barrier(SESSIONS)
    together = await asyncio.gather(*(run_session(server, u, barrier) for u in inputs))
    after = batch_histogram(server)
    singles = after[1.0] - before.get(1.0, 0.0)
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    assert total - singles > 0, "no batched call advanced more than one session"
    assert total < SESSIONS * LENGTH  # fewer calls than frames
    for i in range(3):
        np.testing.assert_allclose(together[i], solo[i], atol=1e-5)
    # Every session against the conv view of its own sequence, and a sample of them against
    # their own solo stream.
    whole = np.array(predict(server.url, "seq", inputs)["outputs"])
    np.testing.assert_allclose(np.stack(together), whole, atol=1e-4)
    for i in range(3, SESSIONS, 40):
        np.testing.assert_allclose(together[i], await run_session(server, inputs[i], None),
                                   atol=1e-5)
