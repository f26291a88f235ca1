"""Streamed outputs equal POST predict (the conv view) on the same sequence, over real sockets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.server.client import (
    connect,
    predict,
    random_splits,
    send_json,
    start,
    stream_binary,
    stream_json,
)
from tests.server.conftest import MODEL_CONFIGS

LENGTH = 120


def sequence(name: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((LENGTH, MODEL_CONFIGS[name]["d_input"])).astype(np.float32)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
async def test_per_sample_binary_frames_equal_predict(server, name):
    u = sequence(name, 1)
    expected = np.array(predict(server.url, name, u[None])["outputs"])[0]
    d_out = MODEL_CONFIGS[name]["d_output"]
    async with await connect(server.ws_url, name) as ws:
        started = await start(ws)
        assert started["type"] == "started" and started["samples"] == 0
        got = await stream_binary(ws, [u[t : t + 1] for t in range(LENGTH)], d_out)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
async def test_random_chunks_binary_and_json_equal_predict(server, name):
    u = sequence(name, 2)
    expected = np.array(predict(server.url, name, u[None])["outputs"])[0]
    chunks = np.split(u, random_splits(np.random.default_rng(3), LENGTH))
    d_out = MODEL_CONFIGS[name]["d_output"]
    async with await connect(server.ws_url, name) as ws:
        await start(ws)
        got_binary = await stream_binary(ws, chunks, d_out)
    async with await connect(server.ws_url, name) as ws:
        await start(ws)
        replies = await stream_json(ws, chunks)
    np.testing.assert_allclose(got_binary, expected, atol=1e-4)
    assert [r["seq"] for r in replies] == list(range(len(chunks)))
    assert [r["t"] for r in replies] == [0, *np.cumsum([len(c) for c in chunks])[:-1]]
    np.testing.assert_allclose(np.concatenate([r["data"] for r in replies]), expected, atol=1e-4)


async def test_int16_frames_and_output_last(server):
    rng = np.random.default_rng(4)
    pcm = rng.integers(-20000, 20000, size=(LENGTH, 1), dtype=np.int16)
    expected = np.array(predict(server.url, "cls", pcm[None] / 32768.0)["outputs"])[0]
    chunks = np.split(pcm, [30, 31, 90])
    async with await connect(server.ws_url, "cls") as ws:
        started = await start(ws, dtype="int16", output="last")
        assert started["dtype"] == "int16" and started["labels"] == ["low", "mid", "high"]
        got = await stream_binary(ws, chunks, 3, dtype="<i2")
    ends = [30, 31, 90, LENGTH]
    np.testing.assert_allclose(got, expected[[e - 1 for e in ends]], atol=1e-4)


async def test_sample_rate_rescales_like_predict(server):
    u = sequence("seq", 5)
    slow = np.array(predict(server.url, "seq", u[None], sample_rate=50)["outputs"])[0]
    native = np.array(predict(server.url, "seq", u[None])["outputs"])[0]
    assert np.abs(slow - native).max() > 1e-3  # the rate really changes the dynamics
    async with await connect(server.ws_url, "seq") as ws:
        started = await start(ws, sample_rate=50)
        assert started["sample_rate"] == 50
        got = await stream_binary(ws, np.split(u, [7, 60]), 3)
    np.testing.assert_allclose(got, slow, atol=1e-4)


async def test_prefill_state_then_stream_equals_whole_predict(server):
    u = sequence("seq", 6)
    whole = np.array(predict(server.url, "seq", u[None])["outputs"])[0]
    prefill = predict(server.url, "seq", u[None, :80], return_state=True)
    async with await connect(server.ws_url, "seq") as ws:
        started = await start(ws, state=prefill["state"][0])
        assert started["samples"] == 80
        got = await stream_binary(ws, [u[80:100], u[100:]], 3)
        ended = await send_json(ws, {"type": "end"})
        assert ended == {"type": "end", "samples": LENGTH}
        await ws.wait_closed()
        assert ws.close_code == 1000
    np.testing.assert_allclose(got, whole[80:], atol=1e-4)
    json.dumps(prefill)  # the answer is plain JSON
