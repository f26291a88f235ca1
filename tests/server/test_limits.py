"""Limits with their documented answers: 1013, 1009, idle timeout, auth, origin, 413, 503,
and backpressure on a flooding client."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest
import websockets

from tests.server.client import connect, start
from tests.server.conftest import ServerThread, make_settings


@pytest.fixture(scope="module")
def strict(model_dirs, tmp_path_factory):
    settings = make_settings(
        model_dirs, tmp_path_factory.mktemp("strict"), max_sessions=2, max_frame_bytes=4096,
        idle_timeout=0.5, api_keys=["k1", "k2"], allowed_origins=["https://ok.example"],
        max_body_bytes=2000, max_batch_length=100, session_queue=4, max_json_values=120,
    )
    with ServerThread(settings) as running:
        yield running


KEY = {"Authorization": "Bearer k2"}


async def closed_with(ws) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await ws.recv()
    return ws.close_code, ws.close_reason


async def test_ws_auth_and_origin(strict):
    async with await connect(strict.ws_url, "seq") as ws:
        assert (await closed_with(ws))[0] == 1008
    wrong = {"Authorization": "Bearer x"}
    async with await connect(strict.ws_url, "seq", additional_headers=wrong) as ws:
        assert await closed_with(ws) == (1008, "unauthorized")
    async with await websockets.connect(f"{strict.ws_url}/v1/models/seq/stream?token=k1") as ws:
        assert (await start(ws))["type"] == "started"
    async with await connect(strict.ws_url, "seq", additional_headers=KEY,
                             origin="https://evil.example") as ws:
        assert await closed_with(ws) == (1008, "origin_not_allowed")
    async with await connect(strict.ws_url, "seq", additional_headers=KEY,
                             origin="https://ok.example") as ws:
        assert (await start(ws))["type"] == "started"


def test_http_auth(strict):
    assert httpx.get(strict.url + "/v1/models").status_code == 401
    wrong = httpx.get(strict.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert httpx.get(strict.url + "/v1/models", headers=KEY).status_code == 200
    for probe in ("/healthz", "/readyz", "/metrics"):  # every HTTP request (API.md)
        assert httpx.get(strict.url + probe).status_code == 401
        assert httpx.get(strict.url + probe, headers=KEY).status_code == 200


def test_probes_public_opens_the_probes_and_metrics_only(model_dirs, tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app

    app = create_app(make_settings(model_dirs, tmp_path, api_keys=["k"], probes_public=True))
    with TestClient(app) as client:
        for probe in ("/healthz", "/metrics"):
            assert client.get(probe).status_code == 200
        assert client.get("/readyz").status_code in (200, 503)  # answered, not 401
        assert client.get("/v1/models").status_code == 401


def test_predict_limits_are_413(strict):
    url = strict.url + "/v1/models/seq/predict"
    big = httpx.post(url, json={"inputs": np.zeros((1, 200, 2)).tolist()}, headers=KEY)
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    long = httpx.post(url, json={"inputs": np.zeros((2, 60, 2), int).tolist()}, headers=KEY)
    assert long.status_code == 413 and "batch" in long.json()["error"]["message"]
    ok = httpx.post(url, json={"inputs": np.zeros((1, 40, 2), int).tolist()}, headers=KEY)
    assert ok.status_code == 200  # 40 × 3 outputs: just within max_json_values
    wordy = httpx.post(url, json={"inputs": np.zeros((1, 41, 2), int).tolist()}, headers=KEY)
    assert wordy.status_code == 413 and ".npy" in wordy.json()["error"]["message"]
    last = httpx.post(url, json={"inputs": np.zeros((1, 41, 2), int).tolist(),
                                 "outputs": "last"}, headers=KEY)
    assert last.status_code == 200


async def test_oversized_frame_closes_1009(strict):
    async with await connect(strict.ws_url, "seq", additional_headers=KEY) as ws:
        await start(ws)
        await ws.send(np.zeros((1024, 2), "<f4").tobytes())  # 8 KiB > 4 KiB
        assert (await closed_with(ws))[0] == 1009


async def test_idle_session_is_closed(strict):
    async with await connect(strict.ws_url, "seq", additional_headers=KEY) as ws:
        await start(ws)
        assert await closed_with(ws) == (1008, "idle_timeout")


async def test_session_limit_closes_1013(strict):
    first = await connect(strict.ws_url, "seq", additional_headers=KEY)
    second = await connect(strict.ws_url, "seq", additional_headers=KEY)
    await start(first)
    await start(second)
    async with await connect(strict.ws_url, "seq", additional_headers=KEY) as third:
        assert await closed_with(third) == (1013, "overloaded")
    await first.close()
    await second.close()


def queue_depth(server) -> float:
    text = httpx.get(server.url + "/metrics", headers=KEY).text
    return float(re.search(r's4serve_queue_depth\{model="seq"\} (\S+)', text).group(1))


async def test_flooding_client_is_slowed_not_buffered(strict):
    """A client that sends without reading: the server reads no further once `session_queue`
    (4) replies are pending, so the frames it holds stay bounded while the client piles up.
    Frames of 256 samples: replies large enough to fill the socket buffers within the test
    even when the server keeps pace with the flood."""
    frame = np.zeros((256, 2), "<f4").tobytes()
    ws = await connect(strict.ws_url, "seq", additional_headers=KEY, max_queue=4,
                       ping_interval=None)
    await start(ws)
    sent = 0

    async def flood():
        nonlocal sent
        while True:
            await ws.send(frame)
            sent += 1
            if sent % 64 == 0:
                await asyncio.sleep(0)

    flooding = asyncio.create_task(flood())
    depths = []
    for _ in range(5):
        await asyncio.sleep(0.2)
        depths.append(await asyncio.to_thread(queue_depth, strict))
    flooding.cancel()
    answered = await asyncio.to_thread(frames_answered, strict)
    ws.transport.abort()  # a graceful close would queue behind the flood
    assert max(depths) <= 4
    assert sent > answered + 100  # the rest waited outside the server's queues
    async with await connect(strict.ws_url, "seq", additional_headers=KEY) as ws:
        assert (await start(ws))["type"] == "started"  # and the server is fine


def frames_answered(server) -> float:
    text = httpx.get(server.url + "/metrics", headers=KEY).text
    found = re.search(r's4serve_frames_total\{model="seq",outcome="ok"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0
