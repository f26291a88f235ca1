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


async def _silent_for(ws, seconds: float, send_every: float | None) -> int:
    """The client reads nothing (so answers no ping) for `seconds`, sending a one-sample
    frame every `send_every` seconds, or nothing. Returns how many frames it sent."""
    ws.transport.pause_reading()
    frame = np.zeros((1, 2), np.float32).tobytes()
    loop = asyncio.get_running_loop()
    end, sent = loop.time() + seconds, 0
    while loop.time() < end:
        if send_every is not None:
            await ws.send(frame)
            sent += 1
        await asyncio.sleep(send_every or 0.1)
    ws.transport.resume_reading()
    return sent


async def test_keepalive_closes_a_silent_client_but_not_one_that_sends(model_dirs, tmp_path):
    """A client that neither answers pings nor sends anything for longer than interval +
    timeout is closed 1011; one whose pongs are late but whose frames keep coming is alive,
    and is pinged again instead."""
    with ServerThread(make_settings(model_dirs, tmp_path), ws_ping_interval=0.3,
                      ws_ping_timeout=0.3) as server:
        url = server.ws_url + "/v1/models/seq/stream"
        async with websockets.connect(url, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
            sent = await _silent_for(ws, 2.0, send_every=0.05)
            answered = 0
            while answered < sent:  # every frame sent while silent is answered
                answered += isinstance(await asyncio.wait_for(ws.recv(), 10), bytes)
            assert sent >= 10 and ws.close_code is None
        async with websockets.connect(url, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
            await _silent_for(ws, 2.0, send_every=None)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd.code == 1011


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
