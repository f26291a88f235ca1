"""Flow control that does not cost a healthy client its connection: keepalive goes on while
reading is paused by the server's own backpressure; a connection closed while paused ends at
once (its close reply was left unread for 10 s); and the client library fails, not hangs, once
its session is gone."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from client import AsyncClient, StreamError
from tests.server.conftest import ServerThread, make_settings


async def test_keepalive_does_not_close_a_client_whose_frames_wait(model_dirs, tmp_path):
    """Big frames fill the session's queue, so the server stops reading the socket, and the
    client's pongs wait unread behind the frames: that is no reason to close it 1011."""
    settings = make_settings(model_dirs, tmp_path, session_queue=4)
    with ServerThread(settings, ws_ping_interval=0.5, ws_ping_timeout=0.5) as server:
        async with websockets.connect(server.ws_url + "/v1/models/seq/stream", max_size=None,
                                      ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
            frame = np.zeros((100_000, 2), np.float32).tobytes()
            got = 0

            async def read() -> None:
                nonlocal got
                async for _ in ws:
                    got += 1
                    if got == 30:
                        return

            reader = asyncio.ensure_future(read())
            for _ in range(30):
                await ws.send(frame)
            await asyncio.wait_for(reader, 60)  # every frame answered, nothing closed
            assert got == 30 and ws.close_code is None


async def test_the_stream_fails_every_recv_once_the_session_is_gone(model_dirs, tmp_path):
    """Taken over with frames queued and reading paused (session_queue 2): the close comes at
    once, and every later recv() raises."""
    with ServerThread(make_settings(model_dirs, tmp_path, session_queue=2)) as server:
        async with AsyncClient(server.url) as c, c.stream("seq", reconnect=False) as s:
            await s.feed(np.zeros((4, 2), np.float32))
            await s.recv()
            token = s.info["resume_token"]
            long = np.zeros((50_000, 2), np.float32)
            for _ in range(5):
                await s.feed(long)
            async with c.stream("seq", resume=token):  # taken over: the rest never comes
                began = asyncio.get_running_loop().time()
                for _ in range(6):
                    try:
                        await asyncio.wait_for(s.recv(), 10)
                    except StreamError:
                        break
                assert asyncio.get_running_loop().time() - began < 5
                with pytest.raises(StreamError):
                    await asyncio.wait_for(s.recv(), 5)  # again: raises, does not hang
