"""The streaming hot path over real sockets: work of a gone client is dropped, overload is
answered in the frame's reply slot, big frames do not starve small ones, non-finite frames
are rejected whole, and the plain ASGI transport gives the same answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.server.client import connect, predict, start, stream_binary
from tests.server.conftest import ServerThread, make_settings


def metric(server, name: str, labels: str = 'model="seq"') -> float:
    text = httpx.get(server.url + "/metrics").text
    found = re.search(rf"{name}\{{{labels}\}} (\S+)", text)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def tight(model_dirs, tmp_path_factory):
    """One frame queued per model at most: the next is answered `overloaded`."""
    settings = make_settings(model_dirs, tmp_path_factory.mktemp("tight"), max_queued_frames=1)
    with ServerThread(settings) as running:
        yield running


async def test_disconnected_clients_work_is_dropped_at_once(server):
    frame = np.zeros((4000, 2), "<f4").tobytes()  # 63 ticks of 64 samples each
    clients = []
    for _ in range(20):
        clients.append(await connect(server.ws_url, "seq"))
        await start(clients[-1])
    for ws in clients:
        for _ in range(16):
            await ws.send(frame)
    await asyncio.sleep(0.3)
    assert await asyncio.to_thread(metric, server, "s4serve_queue_depth") > 20
    for ws in clients:
        ws.transport.abort()
    deadline = time.monotonic() + 5
    while await asyncio.to_thread(metric, server, "s4serve_queue_depth") > 0:
        assert time.monotonic() < deadline, "queued frames of gone clients still computed"
        await asyncio.sleep(0.05)
    done = await asyncio.to_thread(metric, server, "s4serve_samples_total",
                                   'model="seq",mode="stream"')
    await asyncio.sleep(0.5)
    assert await asyncio.to_thread(metric, server, "s4serve_samples_total",
                                   'model="seq",mode="stream"') == done
    assert done < 20 * 16 * 4000 / 2  # most of the queued work was never computed
    async with await connect(server.ws_url, "seq") as ws:  # slots are free again
        assert (await start(ws))["type"] == "started"


async def test_overload_is_answered_in_the_frames_reply_slot(tight):
    # the first frame spans many ticks (pieces of tick_samples), so the frames sent behind
    # it find the model's one queue place taken whatever the machine's speed
    frames = [np.zeros((4000, 2), np.float32)] + [
        row[None] for row in np.random.default_rng(3).standard_normal((9, 2)).astype(np.float32)]
    async with await connect(tight.ws_url, "seq") as ws:
        await start(ws)
        for frame in frames:
            await ws.send(frame.tobytes())
        accepted, overloaded = [], 0
        for seq in range(len(frames)):
            reply = await ws.recv()
            if isinstance(reply, bytes):
                accepted.append(seq)
                continue
            message = json.loads(reply)
            assert (message["code"], message["seq"]) == ("overloaded", seq)
            overloaded += 1
        await ws.send(json.dumps({"type": "snapshot"}))
        snapshot = json.loads(await ws.recv())
    assert overloaded >= 1 and accepted  # the first frame always fits
    # rejected frames left the state alone
    assert snapshot["samples"] == sum(len(frames[seq]) for seq in accepted)


async def test_big_frames_do_not_hold_up_small_ones(server):
    big = np.zeros((20000, 2), "<f4").tobytes()  # 79 rounds each
    heavy_frames = 40  # ~0.4 s of rounds with the native step; all within session_queue
    async with await connect(server.ws_url, "seq") as heavy, \
            await connect(server.ws_url, "seq") as light:
        await start(heavy)
        await start(light)
        for _ in range(heavy_frames):
            await heavy.send(big)
        for _ in range(20):  # one at a time: each waits for its reply
            await light.send(np.zeros((1, 2), "<f4").tobytes())
            await light.recv()
        heavy_done = 0
        while True:
            try:
                await asyncio.wait_for(heavy.recv(), 0.001)
                heavy_done += 1
            except TimeoutError:
                break
        assert heavy_done < heavy_frames  # the light session finished first
        for _ in range(heavy_frames - heavy_done):
            await heavy.recv()


async def test_non_finite_frames_are_rejected_whole(server):
    u = np.random.default_rng(5).standard_normal((6, 2)).astype(np.float32)
    expected = np.array(predict(server.url, "seq", u[None])["outputs"])[0]
    bad_frames = [np.array([[np.nan, 0]], "<f4"), np.array([[3e38, 3e38]], "<f4"),
                  np.full((100, 2), 3e38, "<f4")]
    async with await connect(server.ws_url, "seq") as ws:
        await start(ws)
        got = [await stream_binary(ws, [u[:3]], 3)]
        for bad in bad_frames:
            await ws.send(bad.tobytes())
            assert json.loads(await ws.recv())["code"] == "non_finite"
        got.append(await stream_binary(ws, [u[3:4], u[4:]], 3))
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


def test_plain_asgi_transport_gives_the_same_answers(model_dirs, tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app

    u = np.random.default_rng(9).standard_normal((12, 2)).astype(np.float32)
    app = create_app(make_settings(model_dirs, tmp_path, step_compiler="torchscript"))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        expected = np.array(client.post("/v1/models/seq/predict",
                                        json={"inputs": u[None].tolist()}).json()["outputs"])[0]
        with client.websocket_connect("/v1/models/seq/stream") as ws:
            ws.send_text(json.dumps({"type": "start"}))
            assert json.loads(ws.receive_text())["type"] == "started"
            for frame in (u[:1], u[1:5], u[5:]):
                ws.send_bytes(frame.tobytes())
            got = [np.frombuffer(ws.receive_bytes(), "<f4").reshape(-1, 3) for _ in range(3)]
            ws.send_bytes(b"odd")
            assert json.loads(ws.receive_text())["code"] == "bad_shape"
            ws.send_text(json.dumps({"type": "end"}))
            assert json.loads(ws.receive_text()) == {"type": "end", "samples": 12}
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


# 20 clients that start a session, then send frames as fast as the socket takes them and
# never read a reply: in a process of their own, so that they load the server, not the test.
HOGS = """
import asyncio, json, sys
import websockets
async def main(url):
    frame = bytes(64 * 2 * 4)
    hogs = []
    for _ in range(20):
        ws = await websockets.connect(url, max_queue=1, ping_interval=None)
        await ws.send(json.dumps({"type": "start"}))
        await ws.recv()
        hogs.append(ws)
    print("flooding", flush=True)
    async def flood(ws):
        while True:
            await ws.send(frame)
    await asyncio.gather(*(flood(ws) for ws in hogs))
asyncio.run(main(sys.argv[1]))
"""


async def test_clients_that_never_read_do_not_hurt_the_others(server):
    """20 clients flood and never read their replies; 3 normal clients beside them keep
    every reply and their keepalive pings (every 0.2 s, 1 s timeout) are answered."""
    hogs = subprocess.Popen([sys.executable, "-c", HOGS, f"{server.ws_url}/v1/models/seq/stream"],
                            stdout=subprocess.PIPE, text=True)
    assert hogs.stdout.readline().strip() == "flooding"
    u = np.random.default_rng(8).standard_normal((150, 2)).astype(np.float32)
    expected = np.array(predict(server.url, "seq", u[None])["outputs"])[0]

    async def normal() -> np.ndarray:
        async with await connect(server.ws_url, "seq", ping_interval=0.2,
                                 ping_timeout=1.0) as ws:
            await start(ws)
            out = []
            for row in u:
                out.append(await stream_binary(ws, [row[None]], 3))
                await asyncio.sleep(0.01)
            return np.concatenate(out)

    try:
        results = await asyncio.gather(*(normal() for _ in range(3)))
    finally:
        hogs.kill()
        hogs.wait()
    for got in results:
        np.testing.assert_allclose(got, expected, atol=1e-4)


async def test_under_pressure_frames_wait_in_the_socket_not_in_the_queue(model_dirs, tmp_path):
    """A server that cannot keep up (each batched step made 3 ms slower) with clients that
    send 300 frames at once: under pressure connections stop reading at pressed_queue, the
    rest are read later; every frame is still answered, in order, with the outputs of
    predict."""
    settings = make_settings(model_dirs, tmp_path, press_lag=1e-3, pressed_queue=2,
                             step_compiler="torchscript")
    with ServerThread(settings) as srv:
        scheduler, deepest = srv.runtime.scheduler, [0]
        submit = scheduler.submit

        def watched(stream, item):
            submit(stream, item)
            if scheduler.pressed:
                deepest[0] = max(deepest[0], len(stream.queue))

        scheduler.submit = watched
        backend = srv.runtime.models["seq"].backend
        step = backend.step_flat

        def slow_step(*args):
            time.sleep(0.003)
            return step(*args)

        backend.step_flat = slow_step
        u = np.random.default_rng(5).standard_normal((300, 2)).astype(np.float32)
        sessions = []
        for _ in range(4):
            ws = await connect(srv.ws_url, "seq")
            await start(ws)
            sessions.append(ws)
        outs = await asyncio.gather(*(stream_binary(ws, list(u[:, None]), 3) for ws in sessions))
        for ws in sessions:
            await ws.close()
        backend.step_flat = step
        expected = np.asarray(predict(srv.url, "seq", u[None])["outputs"])[0]
    # a connection resumes reading at half its limit (8 of session_queue 16); once pressure
    # is known its next frame pauses it, so no queue fills to session_queue (without
    # pressure they do: 16)
    assert 0 < deepest[0] <= settings.session_queue // 2 + 1
    for out in outs:
        np.testing.assert_allclose(out, expected, atol=1e-4)


@contextlib.contextmanager
def watched_and_slowed(srv, seen, call: str, seconds: float):
    """Every submit reported to `seen(stream)`, and the backend's `call` made `seconds`
    slower, so that queues build up."""
    scheduler, backend = srv.runtime.scheduler, srv.runtime.models["seq"].backend
    submit, original = scheduler.submit, getattr(backend, call)

    def watched(stream, item):
        submit(stream, item)
        seen(stream)

    def slow(*args):
        time.sleep(seconds)
        return original(*args)

    scheduler.submit = watched
    setattr(backend, call, slow)
    try:
        yield
    finally:
        scheduler.submit = submit
        setattr(backend, call, original)


async def test_queued_samples_are_bounded_in_bytes_per_session_and_per_model(model_dirs,
                                                                             tmp_path):
    """Frames of 256 samples (2 KiB as float32) into a server that cannot keep up: reading
    pauses at session_queue_kb (8 KiB: 4 frames), far below session_queue (16 frames); every
    frame is still answered, in order, as predict computes it, and the byte counts return
    to zero."""
    settings = make_settings(model_dirs, tmp_path, press_lag=100.0, session_queue_kb=8,
                             step_compiler="torchscript")
    with ServerThread(settings) as srv:
        deepest = [0]

        def seen(stream):
            deepest[0] = max(deepest[0], len(stream.queue))

        u = np.random.default_rng(6).standard_normal((40 * 256, 2)).astype(np.float32)
        # a 256-sample frame is one chunk call
        with watched_and_slowed(srv, seen, "chunk_flat", 0.01):
            ws = await connect(srv.ws_url, "seq")
            await start(ws)
            out = await stream_binary(ws, [u[i:i + 256] for i in range(0, len(u), 256)], 3)
            await ws.close()
        model = next(iter(srv.runtime.scheduler._models.values()))
        expected = np.asarray(predict(srv.url, "seq", u[None])["outputs"])[0]
    assert 0 < deepest[0] <= 4  # 8 KiB of 2 KiB frames
    assert model.queued == 0 and model.queued_bytes == 0
    np.testing.assert_allclose(out, expected, atol=1e-4)


async def test_a_model_past_its_queued_bytes_answers_overloaded(model_dirs, tmp_path):
    """max_queued_mb 1 with 64 KiB frames that take a while (session_queue 64, so that one
    session can reach the model's bound): the frames past 1 MiB queued are
    answered `overloaded` in their reply slot (state unchanged), the others with outputs."""
    settings = make_settings(model_dirs, tmp_path, press_lag=100.0, max_queued_mb=1,
                             session_queue=64, step_compiler="torchscript")
    with ServerThread(settings) as srv:
        most = [0]
        models = srv.runtime.scheduler._models

        def seen(stream):
            most[0] = max(most[0], models[stream.pool].queued_bytes)

        frame = np.zeros((8192, 2), "<f4")  # 64 KiB
        with watched_and_slowed(srv, seen, "chunk_flat", 0.002):
            ws = await connect(srv.ws_url, "seq")
            await start(ws)
            for _ in range(40):
                await ws.send(frame.tobytes())
            replies = [await ws.recv() for _ in range(40)]
            await ws.close()
    refused = [json.loads(r)["code"] for r in replies if isinstance(r, str)]
    assert refused and set(refused) == {"overloaded"}
    assert len(refused) < 40 and most[0] <= (1 << 20) + frame.nbytes


async def test_frames_refused_past_capacity_are_read_a_few_per_tick(model_dirs, tmp_path):
    """Past capacity, a connection answers at most `pressed_queue` frames `overloaded` and then
    stops reading until a tick has run: answering costs about what computing does, and a
    flood of frames read and refused took the loop from the ticks that end the overload.
    Every frame is still answered, in order."""
    settings = make_settings(model_dirs, tmp_path, pressed_queue=2)
    with ServerThread(settings) as srv:
        scheduler, runtime = srv.runtime.scheduler, srv.runtime
        ticks_at_refusal: list[int] = []
        error = runtime.error

        def counted(code: str) -> None:
            if code == "overloaded":
                ticks_at_refusal.append(scheduler.ticks)
            error(code)

        async with await connect(srv.ws_url, "seq") as ws:
            await start(ws)
            runtime.error = counted
            scheduler.overloaded = lambda pool: True
            try:
                frame = np.zeros((1, 2), "<f4").tobytes()
                await asyncio.gather(*(ws.send(frame) for _ in range(12)))
                replies = [json.loads(await ws.recv()) for _ in range(12)]
            finally:
                del scheduler.overloaded
                runtime.error = error
    assert [(r["code"], r["seq"]) for r in replies] == [("overloaded", s) for s in range(12)]
    per_tick = [ticks_at_refusal.count(t) for t in set(ticks_at_refusal)]
    assert len(ticks_at_refusal) == 12 and max(per_tick) <= 2 and len(per_tick) >= 6
