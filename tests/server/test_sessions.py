"""Snapshot, reset, end, resume after a dropped connection, and takeover."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from tests.server.client import connect, predict, send_json, start, stream_binary

U = np.random.default_rng(21).standard_normal((60, 2)).astype(np.float32)


def expected(server) -> np.ndarray:
    return np.array(predict(server.url, "seq", U[None])["outputs"])[0]


async def test_snapshot_reset_and_end(server):
    whole = expected(server)
    async with await connect(server.ws_url, "seq") as ws:
        await start(ws)
        await stream_binary(ws, [U[:25]], 3)
        snap = await send_json(ws, {"type": "snapshot"})
        assert snap["type"] == "snapshot" and snap["samples"] == 25
        assert await send_json(ws, {"type": "reset"}) == {"type": "reset", "samples": 0}
        fresh = await stream_binary(ws, [U[:10]], 3)  # from zeros again
        np.testing.assert_allclose(fresh, whole[:10], atol=1e-4)
        assert (await send_json(ws, {"type": "snapshot"}))["samples"] == 10
    async with await connect(server.ws_url, "seq") as ws:
        started = await start(ws, state=snap["state"])
        assert started["samples"] == 25
        rest = await stream_binary(ws, [U[25:]], 3)
        assert await send_json(ws, {"type": "end"}) == {"type": "end", "samples": len(U)}
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
    np.testing.assert_allclose(rest, whole[25:], atol=1e-4)


async def test_resume_after_dropped_connection_is_identical(server):
    uninterrupted = None
    async with await connect(server.ws_url, "seq") as ws:
        await start(ws)
        uninterrupted = await stream_binary(ws, [U[t : t + 5] for t in range(0, 60, 5)], 3)

    ws = await connect(server.ws_url, "seq")
    started = await start(ws)
    token = started["resume_token"]
    before = await stream_binary(ws, [U[t : t + 5] for t in range(0, 30, 5)], 3)
    ws.transport.abort()  # the network drops: no close handshake, no end
    await asyncio.sleep(0.2)

    async with await connect(server.ws_url, "seq") as ws2:
        resumed = await start(ws2, resume=token)
        assert resumed["session"] == started["session"]
        assert resumed["samples"] == 30
        after = await stream_binary(ws2, [U[t : t + 5] for t in range(30, 60, 5)], 3)
    # Identical: the same operations on the same state give the same floats.
    np.testing.assert_array_equal(np.concatenate([before, after]), uninterrupted)


async def test_resume_takes_over_a_connection_the_server_thinks_alive(server):
    old = await connect(server.ws_url, "seq")
    started = await start(old)
    await stream_binary(old, [U[:7]], 3)
    async with await connect(server.ws_url, "seq") as new:
        resumed = await start(new, resume=started["resume_token"])
        assert resumed["samples"] == 7
        with pytest.raises(websockets.ConnectionClosed):
            await old.recv()
        assert (old.close_code, old.close_reason) == (1008, "resumed_elsewhere")
        got = await stream_binary(new, [U[7:]], 3)
    np.testing.assert_allclose(got, expected(server)[7:], atol=1e-4)


async def test_ended_session_cannot_be_resumed(server):
    async with await connect(server.ws_url, "seq") as ws:
        token = (await start(ws))["resume_token"]
        await send_json(ws, {"type": "end"})
    async with await connect(server.ws_url, "seq") as ws:
        reply = await send_json(ws, {"type": "start", "resume": token})
        assert reply["code"] == "resume_not_found"


async def test_a_resume_racing_its_detach_waits_for_it(server):
    """A resume whose record is not in the store yet (another worker's or replica's detach
    still on its way) waits up to `resume_wait` for it instead of failing; an unknown token
    is refused once that time is up."""
    ws = await connect(server.ws_url, "seq")
    token = (await start(ws))["resume_token"]
    await stream_binary(ws, [U[:10]], 3)
    ws.transport.abort()
    store = server.runtime.store
    for _ in range(100):  # the detach has landed: take the record out, as if still on its way
        record = store.take(token)
        if record is not None:
            break
        await asyncio.sleep(0.02)
    assert record is not None and record.samples == 10

    async def lands_late() -> None:
        await asyncio.sleep(0.3)
        assert store.put(token, record, ttl=30, epoch=record.epoch)

    late = asyncio.create_task(lands_late())
    async with await connect(server.ws_url, "seq") as ws2:
        resumed = await start(ws2, resume=token)
        assert resumed["type"] == "started" and resumed["samples"] == 10, resumed
        got = await stream_binary(ws2, [U[10:]], 3)
    await late
    np.testing.assert_allclose(got, expected(server)[10:], atol=1e-4)

    async with await connect(server.ws_url, "seq") as ws3:
        began = asyncio.get_running_loop().time()
        reply = await send_json(ws3, {"type": "start", "resume": "no-such-token"})
        assert reply["code"] == "resume_not_found"
        assert asyncio.get_running_loop().time() - began >= server.runtime.settings.resume_wait


def outputs_of(reply: bytes) -> np.ndarray:
    return np.frombuffer(reply, "<f4").reshape(-1, 3)


async def test_replies_lost_with_the_connection_are_sent_again_on_resume(server):
    """The server answered 6 frames and a snapshot that the client never read before its
    connection died. Resuming with `received` (the replies it did read) gets them again, in
    their order, before anything else; the outputs then equal predict, none lost or doubled."""
    ws = await connect(server.ws_url, "seq")
    token = (await start(ws))["resume_token"]
    for t in range(0, 15, 3):
        await ws.send(U[t:t + 3].tobytes())
    await ws.send('{"type": "snapshot"}')
    for t in range(15, 24, 3):
        await ws.send(U[t:t + 3].tobytes())
    read = [outputs_of(await ws.recv()) for _ in range(2)]
    session = server.runtime.manager.live[token]
    for _ in range(500):  # until all is answered (the rest stays unread)
        if session.stream.samples == 24 and session.ring.count == 9:
            break
        await asyncio.sleep(0.02)
    ws.transport.abort()
    await asyncio.sleep(0.2)

    async with await connect(server.ws_url, "seq") as ws2:
        resumed = await start(ws2, resume=token, received=2)
        assert (resumed["samples"], resumed["replies"], resumed["resent"]) == (24, 9, 7)
        missed = [await ws2.recv() for _ in range(7)]
        assert json.loads(missed[3])["type"] == "snapshot"  # in its place
        read += [outputs_of(r) for r in missed[:3] + missed[4:]]
        read.append(await stream_binary(ws2, [U[24:]], 3))
    np.testing.assert_allclose(np.concatenate(read), expected(server), atol=1e-4)

    async with await connect(server.ws_url, "seq") as ws3:
        reply = await send_json(ws3, {"type": "start", "received": 2})
        assert reply["code"] == "bad_request"  # received goes with resume


async def test_a_token_presented_to_another_model_stays_resumable(server):
    """The wrong model answers bad_request and puts the session back where a later resume on
    the right model finds it (its take had moved the session's epoch on)."""
    ws = await connect(server.ws_url, "seq")
    token = (await start(ws))["resume_token"]
    await stream_binary(ws, [U[:20]], 3)
    ws.transport.abort()
    await asyncio.sleep(0.3)
    async with await connect(server.ws_url, "cls") as wrong:
        refused = await start(wrong, resume=token)
        assert refused["type"] == "error" and refused["code"] == "bad_request"
    async with await connect(server.ws_url, "seq") as right:
        resumed = await start(right, resume=token)
        assert resumed["type"] == "started" and resumed["samples"] == 20
