"""Every WebSocket error over a real socket: the documented code, state untouched, the session
open, and other sessions undisturbed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import websockets

from tests.server.client import connect, predict, send_json, start, stream_binary

U = np.random.default_rng(11).standard_normal((40, 2)).astype(np.float32)


async def assert_error(ws, payload, code: str) -> dict:
    await ws.send(payload)
    reply = json.loads(await ws.recv())
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]
    return reply


BAD_FRAMES = [
    (np.zeros(3, "<f4").tobytes(), "bad_shape"),  # 12 bytes: not a multiple of 2 × 4
    (b"", "bad_shape"),
    (np.array([[np.nan, 0.0]], "<f4").tobytes(), "non_finite"),
    (np.array([[np.inf, 0.0]], "<f4").tobytes(), "non_finite"),
    (json.dumps({"type": "samples", "data": [[1.0, 2.0, 3.0]]}), "bad_shape"),
    (json.dumps({"type": "samples", "data": [[1.0], [2.0, 3.0]]}), "bad_shape"),
    (json.dumps({"type": "samples", "data": [["a", "b"]]}), "bad_dtype"),
    (json.dumps({"type": "samples", "data": [[True, 0.5]]}), "bad_dtype"),  # not 1.0
    ('{"type": "samples", "data": [[NaN, 1.0]]}', "non_finite"),
    ('{"type": "samples", "data": [[1%s, 1.0]]}' % ("0" * 400), "non_finite"),  # > float64
    (json.dumps({"type": "samples"}), "bad_shape"),
    (json.dumps({"type": "dance"}), "unknown_type"),
    ("{not json", "bad_request"),
    (json.dumps([1, 2]), "bad_request"),
    (json.dumps({"type": "start"}), "already_started"),
]


async def test_bad_frames_are_rejected_whole_and_change_nothing(server):
    expected = np.array(predict(server.url, "seq", U[None])["outputs"])[0]
    async with await connect(server.ws_url, "seq") as ws, \
            await connect(server.ws_url, "seq") as bystander:
        await start(ws)
        await start(bystander)
        first = await stream_binary(ws, [U[:10]], 3)
        other_first = await stream_binary(bystander, [U[:10]], 3)
        for payload, code in BAD_FRAMES:
            await assert_error(ws, payload, code)
        # Rejected frames take their reply slot in order, pipelined with good ones.
        await ws.send(U[10:20].tobytes())
        await ws.send(np.zeros(3, "<f4").tobytes())
        await ws.send(U[20:].tobytes())
        second = np.frombuffer(await ws.recv(), "<f4").reshape(-1, 3)
        error = json.loads(await ws.recv())
        third = np.frombuffer(await ws.recv(), "<f4").reshape(-1, 3)
        assert error["code"] == "bad_shape"
        other_rest = await stream_binary(bystander, [U[10:]], 3)
        snapshot = await send_json(ws, {"type": "snapshot"})
    assert snapshot["samples"] == len(U)
    np.testing.assert_allclose(np.concatenate([first, second, third]), expected, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([other_first, other_rest]), expected, atol=1e-4)


async def test_data_and_control_before_start_is_not_started(server):
    async with await connect(server.ws_url, "seq") as ws:
        await assert_error(ws, U[:1].tobytes(), "not_started")
        await assert_error(ws, json.dumps({"type": "samples", "data": [[0, 0]]}), "not_started")
        await assert_error(ws, json.dumps({"type": "snapshot"}), "not_started")
        await assert_error(ws, json.dumps({"type": "nope"}), "unknown_type")
        await assert_error(ws, "garbage", "bad_request")
        started = await start(ws)
        assert started["type"] == "started"


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"dtype": "float64"}, "bad_dtype"),
        ({"output": "some"}, "bad_request"),
        ({"sample_rate": -5}, "bad_request"),
        ({"sample_rate": "fast"}, "bad_request"),
        ({"state": "not base64!"}, "bad_state"),
        ({"colour": "red"}, "bad_request"),
    ],
)
async def test_bad_start_options_leave_the_connection_open(server, options, code):
    async with await connect(server.ws_url, "seq") as ws:
        await assert_error(ws, json.dumps({"type": "start", **options}), code)
        assert (await start(ws))["type"] == "started"


async def test_state_from_another_model_is_bad_state(server):
    blob = predict(server.url, "cls", np.zeros((1, 5, 1)), return_state=True)["state"][0]
    async with await connect(server.ws_url, "seq") as ws:
        reply = await assert_error(ws, json.dumps({"type": "start", "state": blob}), "bad_state")
        assert "cls" in reply["message"]


async def test_unknown_resume_token_closes_1008(server):
    async with await connect(server.ws_url, "seq") as ws:
        await assert_error(ws, json.dumps({"type": "start", "resume": "nope"}),
                           "resume_not_found")
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008


async def test_unknown_model_closes_1008_with_reason(server):
    async with await connect(server.ws_url, "missing") as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (1008, "model_not_found")
