"""Odd input gets a clear error and costs nothing (issue #15), over real sockets: overflowing
inputs, forged state blobs, absurd JSON nesting, bad start options, out-of-range sample
rates, non-numbers in arrays, trailing bytes, unknown routes; and the catch-all 500."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import websockets

from server.state_blob import _PREFIX, FORMAT_VERSION, MAGIC
from tests.server.client import connect, send_json, start, stream_binary


def forged(samples=0, shape=(16, 4), fill=0.0, **header) -> str:
    """A state blob for `seq` with chosen header fields (seq: 2 layers of (16, 4) re/im)."""
    names = [f"layer{i}.{part}" for i in range(2) for part in ("re", "im")]
    tensors = [{"name": n, "dtype": "float32", "shape": list(shape)} for n in names]
    head = {"model": "seq", "version": "1", "samples": samples, "sample_rate": 100.0,
            "tensors": tensors, **header}
    size = int(np.prod(shape)) if all(isinstance(n, int) and n < 1 << 20 for n in shape) else 1
    body = np.full(4 * size, fill, "<f4").tobytes()
    text = json.dumps(head).encode()
    return base64.b64encode(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(text)) + text + body).decode()


def test_forged_blob_helper_makes_a_valid_blob_by_default(server):
    answer = httpx.post(f"{server.url}/v1/models/seq/predict",
                        json={"inputs": [[[0.0, 0.0]]], "state": [forged(samples=5)]})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("blob", [
    forged(shape=(2**70, 4)), forged(samples=-1), forged(samples=1.5),
    forged(fill=float("nan")), forged(shape=("16", 4)), forged(sample_rate=-3),
])
async def test_forged_state_blobs_are_bad_state(server, blob):
    answer = httpx.post(f"{server.url}/v1/models/seq/predict",
                        json={"inputs": [[[0.0, 0.0]]], "state": [blob]})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_state"
    async with await connect(server.ws_url, "seq") as ws:
        reply = await start(ws, state=blob)
        assert reply["code"] == "bad_state"
        assert (await start(ws))["type"] == "started"  # the connection is still usable


def test_samples_beyond_any_float_are_bad_state(server):
    blob = forged()
    raw = base64.b64decode(blob).replace(b'"samples": 0', b'"samples": 1e400')
    answer = httpx.post(f"{server.url}/v1/models/seq/predict",
                        json={"inputs": [[[0.0, 0.0]]], "state": [base64.b64encode(raw).decode()]})
    assert answer.json()["error"]["code"] == "bad_state"


def test_predict_outputs_that_overflow_are_non_finite(server):
    answer = httpx.post(f"{server.url}/v1/models/seq/predict",
                        json={"inputs": [[[3e38, 3e38], [3e38, 3e38]]]})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "non_finite"
    assert "NaN" not in answer.text


async def test_deep_nesting_and_bad_start_options_keep_the_connection(server):
    nested = "[" * 2000 + "]" * 2000
    async with await connect(server.ws_url, "seq") as ws:
        assert (await send_json(ws, {"type": "samples"}))["code"] == "not_started"
        await ws.send(nested)
        assert json.loads(await ws.recv())["code"] == "bad_request"
        for options, code in (({"dtype": ["float32"]}, "bad_dtype"), ({"dtype": {"a": 1}},
                              "bad_dtype"), ({"output": [1]}, "bad_request"),
                              ({"sample_rate": 1}, "bad_request"),
                              ({"sample_rate": 1e-300}, "bad_request")):
            assert (await start(ws, **options))["code"] == code, options
        assert (await start(ws))["type"] == "started"
        await ws.send(nested)
        assert json.loads(await ws.recv())["code"] == "bad_request"
        out = await stream_binary(ws, [np.zeros((1, 2), np.float32)], 3)
        assert np.isfinite(out).all()


async def test_non_numbers_in_data_are_bad_dtype(server):
    async with await connect(server.ws_url, "seq") as ws:
        await start(ws)
        for data in ([[None, 1.0]], [[{}, 1.0]], [["a", 1.0]]):
            reply = await send_json(ws, {"type": "samples", "data": data})
            assert reply["code"] == "bad_dtype", data
    answer = httpx.post(f"{server.url}/v1/models/seq/predict", json={"inputs": [[[None, 1]]]})
    assert answer.json()["error"]["code"] == "bad_dtype"


def test_trailing_bytes_after_npy_are_refused(server):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 4, 2), np.float32))
    answer = httpx.post(f"{server.url}/v1/models/seq/predict", content=buffer.getvalue() + b"x",
                        headers={"Content-Type": "application/x-npy"})
    assert answer.status_code == 400 and "after the .npy" in answer.json()["error"]["message"]


async def test_unknown_routes_answer_the_documented_way(server):
    answer = httpx.get(f"{server.url}/v1/nothing")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with websockets.connect(f"{server.ws_url}/v1/elsewhere") as ws:
            await ws.recv()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "not_found")
    long_id = "x" * 5000
    answer = httpx.get(f"{server.url}/healthz", headers={"x-request-id": long_id})
    assert answer.headers["x-request-id"] != long_id


def test_unexpected_errors_are_a_documented_500(model_dirs, tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.conftest import make_settings

    app = create_app(make_settings(model_dirs, tmp_path, step_compiler="torchscript"))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/boom")
        assert answer.status_code == 500
        assert answer.json() == {"error": {"code": "internal", "message": "internal error"}}
        assert 's4serve_errors_total{code="internal"} 1.0' in client.get("/metrics").text


def test_an_empty_binary_frame_is_a_bad_frame_without_uvicorns_fast_path(model_dirs, tmp_path):
    """The generic ASGI peer (any server but uvicorn's socket path) reads b"" as binary: a
    bad_shape error in that frame's slot (seq 0), not a text message that is not JSON."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.conftest import make_settings

    with TestClient(create_app(make_settings(model_dirs, tmp_path))) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        with client.websocket_connect("/v1/models/seq/stream") as ws:
            ws.send_text('{"type": "start"}')
            assert json.loads(ws.receive_text())["type"] == "started"
            ws.send_bytes(b"")
            first = json.loads(ws.receive_text())
            assert first["code"] == "bad_shape" and first["seq"] == 0
            ws.send_bytes(b"\0" * 5)
            assert json.loads(ws.receive_text())["seq"] == 1
