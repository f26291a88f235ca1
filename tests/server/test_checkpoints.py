"""Checkpoints of live sessions: a SIGKILLed server loses at most the last checkpoint interval
of each session, the client replays from `samples` and the outputs equal an uninterrupted
stream; one owner across processes (a session taken over elsewhere is let go here); an ended
session leaves nothing resumable. Real `s4serve serve` subprocesses and a real redis-server."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import websockets

from tests.server.client import connect, predict, send_json, start, stream_binary
from tests.server.conftest import ServerThread, free_port, make_settings
from tests.server.test_redis_store import redis_url  # noqa: F401 (fixture)
from tests.server.test_shutdown import launch as launch_server

FRAME = 5


def launch(model_dir: Path, port: int, snapshots: Path, store: str | None = None):
    env = dict(CHECKPOINT_INTERVAL="0.2", STEP_COMPILER="torchscript")
    if store:
        env["STORE"] = store
    return launch_server(model_dir, port, snapshots, "--workers", "1", **env)


async def stream_then_kill(ws_url: str, process, u: np.ndarray, frames: int) -> tuple:
    """Stream `frames` frames, wait past a checkpoint, SIGKILL the server: (token, outputs
    received, samples sent)."""
    ws = await connect(ws_url, "seq")
    token = (await start(ws))["resume_token"]
    got = await stream_binary(ws, [u[i * FRAME:(i + 1) * FRAME] for i in range(frames)], 3)
    await asyncio.sleep(0.6)  # a checkpoint covers these
    for i in range(frames, frames + 3):  # sent, maybe answered, but not in a checkpoint
        await ws.send(u[i * FRAME:(i + 1) * FRAME].tobytes())
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            got = np.concatenate([got, np.frombuffer(await ws.recv(), "<f4").reshape(-1, 3)])
    return token, got, (frames + 3) * FRAME


async def resume_and_replay(ws_url: str, token: str, u: np.ndarray, got: np.ndarray):
    async with await connect(ws_url, "seq") as ws:
        resumed = await start(ws, resume=token)
        assert resumed["type"] == "started", resumed
        samples = resumed["samples"]
        assert 0 < samples <= len(got) and samples % FRAME == 0  # a frame boundary
        rest = u[samples:]
        tail = await stream_binary(ws, [rest[i:i + FRAME] for i in range(0, len(rest), FRAME)], 3)
        assert (await send_json(ws, {"type": "end"}))["samples"] == len(u)
    return np.concatenate([got[:samples], tail]), samples


@pytest.mark.parametrize("elsewhere", [False, True], ids=["local-restart", "redis-other-server"])
async def test_a_sigkilled_server_loses_no_output(model_dirs, tmp_path, redis_url, elsewhere):  # noqa: F811
    u = np.random.default_rng(5).standard_normal((80, 2)).astype(np.float32)
    port = free_port()
    store = redis_url if elsewhere else None
    process = launch(model_dirs["seq"], port, tmp_path / "a", store)
    try:
        expected = np.array(predict(f"http://127.0.0.1:{port}", "seq", u[None])["outputs"])[0]
        token, got, _ = await stream_then_kill(f"ws://127.0.0.1:{port}", process, u, 6)
    finally:
        process.kill()
    # the same directory after a restart, or another replica sharing Redis
    port = free_port()
    process = launch(model_dirs["seq"], port, tmp_path / ("b" if elsewhere else "a"), store)
    try:
        outputs, samples = await resume_and_replay(f"ws://127.0.0.1:{port}", token, u, got)
        async with await connect(f"ws://127.0.0.1:{port}", "seq") as ws:  # ended: gone
            assert (await start(ws, resume=token))["code"] == "resume_not_found"
    finally:
        process.kill()
    assert samples >= 6 * FRAME  # the checkpoint after the first frames was kept
    np.testing.assert_allclose(outputs, expected, atol=1e-4)


async def test_a_quiet_session_stays_resumable_past_resume_ttl(model_dirs, tmp_path):
    """A live session that sends nothing for longer than resume_ttl keeps a checkpoint in the
    store (rewritten before it expires), so a SIGKILL then would lose nothing."""
    settings = make_settings(model_dirs, tmp_path, resume_ttl=1.0, checkpoint_interval=0.2)
    with ServerThread(settings) as server:
        async with await connect(server.ws_url, "seq") as ws:
            token = (await start(ws))["resume_token"]
            await stream_binary(ws, [np.ones((10, 2), np.float32)], 3)
            await asyncio.sleep(2.5)  # quiet, live, past two TTLs of its first checkpoint
            record = server.runtime.store.take(token)
            assert record is not None and record.samples == 10 and record.live


async def test_a_resumed_session_is_in_the_store_before_its_first_checkpoint(model_dirs,
                                                                             tmp_path):
    """A take clears the record it read: the new owner writes it back under the new epoch as
    it resumes, so a SIGKILL before its first checkpoint pass would not lose the session."""
    settings = make_settings(model_dirs, tmp_path, checkpoint_interval=3600.0)
    with ServerThread(settings) as server:
        async with await connect(server.ws_url, "seq") as ws:
            token = (await start(ws))["resume_token"]
            await stream_binary(ws, [np.ones((10, 2), np.float32)], 3)
        async with await connect(server.ws_url, "seq") as ws:  # detached above, resumed here
            assert (await start(ws, resume=token))["samples"] == 10
            record = server.runtime.store.take(token)  # no checkpoint pass ran in between
            assert record is not None and record.samples == 10 and record.epoch == 2


async def test_a_session_taken_over_elsewhere_is_let_go(model_dirs, tmp_path,
                                                       redis_url):  # noqa: F811
    """A live session on A is resumed on B from A's checkpoint, A not hearing B's release
    request (as in a partition): A's next checkpoint is refused, A closes its connection 1008
    resumed_elsewhere and writes nothing more; B's session goes on and its outputs equal
    predict."""
    u = np.random.default_rng(6).standard_normal((40, 2)).astype(np.float32)
    settings = dict(store=redis_url, checkpoint_interval=0.1)
    with (ServerThread(make_settings(model_dirs, tmp_path / "a", **settings)) as a,
          ServerThread(make_settings(model_dirs, tmp_path / "b", **settings)) as b):
        expected = np.array(predict(a.url, "seq", u[None])["outputs"])[0]
        a.runtime.replicas.release = lambda digest: False  # the partition
        on_a = await connect(a.ws_url, "seq")
        token = (await start(on_a))["resume_token"]
        head = await stream_binary(on_a, [u[:10], u[10:20]], 3)
        await asyncio.sleep(0.4)
        async with await connect(b.ws_url, "seq") as on_b:
            resumed = await start(on_b, resume=token)
            assert resumed["samples"] == 20
            await on_a.send(u[20:25].tobytes())  # A still advances its copy...
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(on_a.recv(), 5)
            assert (on_a.close_code, on_a.close_reason) == (1008, "resumed_elsewhere")
            tail = await stream_binary(on_b, [u[20:30], u[30:]], 3)
            await asyncio.sleep(0.3)  # B's checkpoints are written, A's were refused
            fenced = a.runtime.metrics.checkpoints.labels("fenced")._value.get()
            assert fenced >= 1
            assert b.runtime.metrics.checkpoints.labels("fenced")._value.get() == 0
        await asyncio.sleep(0.3)
        async with await connect(b.ws_url, "seq") as again:  # B's state, not A's stale one
            assert (await start(again, resume=token))["samples"] == 40
    np.testing.assert_allclose(np.concatenate([head, tail]), expected, atol=1e-4)


async def test_checkpoint_writes_leave_the_loop_and_keep_their_order(model_dirs, tmp_path):
    """A checkpoint write that waits on its store (a slow disk, a far Redis) stalls no stream,
    and an end arriving meanwhile forgets the session after the write lands, not before."""
    settings = make_settings(model_dirs, tmp_path, checkpoint_interval=0.1)
    u = np.random.default_rng(5).standard_normal((20, 2)).astype(np.float32)
    with ServerThread(settings) as server:
        store = server.runtime.manager.store
        real = store.put_rows
        entered, release = threading.Event(), threading.Event()

        def gated(batch, ttl):  # checkpoints (a detach writes with put)
            entered.set()
            assert release.wait(20)
            return real(batch, ttl)

        store.put_rows = gated
        async with await connect(server.ws_url, "seq") as ws:
            token = (await start(ws))["resume_token"]
            await stream_binary(ws, [u[:10]], 3)
            assert await asyncio.to_thread(entered.wait, 20)  # a checkpoint write waits
            # the server's event loop still streams while that write is held
            await asyncio.wait_for(stream_binary(ws, [u[10:]], 3), 10)
            threading.Timer(0.3, release.set).start()
            assert (await send_json(ws, {"type": "end"}))["samples"] == 20
        assert release.is_set() and store.take(token) is None  # nothing resumable left
