"""Predict in its own worker process, over real sockets: a long request is cut off at
predict_timeout (504, worker replaced, the next request served); a large JSON body does not
stall streams; state blobs are signed with state_secret; /docs and /openapi.json follow the
keys; the OpenAPI schema describes the predict body."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import pytest

from server.errors import ServeError
from server.state_blob import decode_state, encode_state
from tests.server.client import connect, start
from tests.server.conftest import ServerThread, make_settings


@pytest.fixture(scope="module")
def strict(model_dirs, tmp_path_factory):
    settings = make_settings(model_dirs, tmp_path_factory.mktemp("strict"), predict_timeout=0.5,
                             state_secret="s3cret", api_keys=["k"])
    with ServerThread(settings) as running:
        yield running


KEY = {"Authorization": "Bearer k"}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()


def test_a_predict_past_its_time_limit_is_cut_off_and_the_next_one_served(strict):
    big = np.random.default_rng(0).standard_normal((64, 60_000, 2))  # seconds of compute
    began = time.monotonic()
    answer = httpx.post(f"{strict.url}/v1/models/seq/predict", content=_npy(big), timeout=120,
                        headers={**KEY, "Content-Type": "application/x-npy"})
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "timeout"
    assert time.monotonic() - began < 30  # cut off, not run to the end
    small = httpx.post(f"{strict.url}/v1/models/seq/predict", headers=KEY, timeout=120,
                       json={"inputs": np.zeros((1, 10, 2)).tolist()})
    assert small.status_code == 200 and np.asarray(small.json()["outputs"]).shape == (1, 10, 3)
    metrics = httpx.get(f"{strict.url}/metrics", headers=KEY, timeout=10).text
    assert 's4serve_errors_total{code="timeout"} 1.0' in metrics


async def test_a_large_json_predict_does_not_stall_streams(server):
    body = {"inputs": np.full((1, 1_200_000, 2), 0.25).tolist()}  # ~17 MB of JSON
    async with await connect(server.ws_url, "seq") as ws:
        await start(ws)
        async with httpx.AsyncClient(timeout=120) as http:
            request = asyncio.ensure_future(
                http.post(f"{server.url}/v1/models/seq/predict", json=body))
            await asyncio.sleep(0.05)
            worst = 0.0
            while not request.done():
                sent = time.perf_counter()
                await ws.send(np.zeros((1, 2), "<f4").tobytes())
                await ws.recv()
                worst = max(worst, time.perf_counter() - sent)
                await asyncio.sleep(0.01)
            assert (await request).status_code == 200
    assert worst < 1.0, f"a stream frame waited {worst:.2f} s behind the predict"


async def test_state_blobs_are_signed_and_foreign_ones_refused(strict):
    u = np.random.default_rng(1).standard_normal((1, 20, 2)).tolist()
    answer = httpx.post(f"{strict.url}/v1/models/seq/predict", headers=KEY, timeout=60,
                        json={"inputs": u, "return_state": True})
    blob = answer.json()["state"][0]
    assert decode_state(blob, "s3cret").samples == 20
    with pytest.raises(ServeError, match="signature does not match"):
        decode_state(blob, "another")
    record = decode_state(blob, "s3cret")
    unsigned = encode_state(record)
    other = encode_state(record, "another")
    raw = bytearray(base64.b64decode(blob))
    raw[-40] ^= 1  # one bit of the tensor bytes
    tampered = base64.b64encode(bytes(raw)).decode()
    async with await connect(strict.ws_url, "seq", additional_headers=KEY) as ws:
        assert (await start(ws, state=blob))["samples"] == 20
    for forged in (unsigned, other, tampered):
        async with await connect(strict.ws_url, "seq", additional_headers=KEY) as ws:
            reply = await start(ws, state=forged)
            assert reply["type"] == "error" and reply["code"] == "bad_state", reply
        answer = httpx.post(f"{strict.url}/v1/models/seq/predict", headers=KEY, timeout=60,
                            json={"inputs": u, "state": [forged]})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_state"


def test_docs_follow_the_keys(strict, server):
    for path in ("/docs", "/openapi.json"):
        refused = httpx.get(strict.url + path, timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert httpx.get(strict.url + path, headers=KEY, timeout=10).status_code == 200
        assert httpx.get(server.url + path, timeout=10).status_code == 200  # no keys: open
    page = httpx.get(strict.url + "/docs?token=k", timeout=10)
    assert page.status_code == 200 and "openapi.json?token=k" in page.text


def test_openapi_describes_the_predict_body(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    post = schema["paths"]["/v1/models/{name}/predict"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"application/json", "application/x-npy"}
    fields = content["application/json"]["schema"]["properties"]
    assert {"inputs", "sample_rate", "outputs", "return_state", "state"} <= set(fields)
    assert post["responses"]["504"]["content"]["application/json"]["schema"]["required"] == [
        "error"]


def test_the_predict_worker_yields_the_cores_to_the_streams(server):
    """Its niceness is predict_nice (5 by default): the server's own process keeps 0."""
    import os

    workers = server.runtime.predict_pool._workers
    assert workers
    for worker in workers:
        assert os.getpriority(os.PRIO_PROCESS, worker.process.pid) == \
            os.getpriority(os.PRIO_PROCESS, 0) + server.runtime.settings.predict_nice == 5


def test_a_large_npy_answer_comes_whole_from_the_worker(server):
    """An answer over a megabyte leaves the worker in a memory file: the client gets every
    byte (the model's own outputs), and the next small answer still comes through the pipe."""
    u = np.random.default_rng(3).standard_normal((8, 20_000, 2)).astype(np.float32) * 0.1
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    answer = httpx.post(f"{server.url}/v1/models/seq/predict", content=_npy(u),
                        headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    got = np.load(io.BytesIO(answer.content))
    assert got.shape == (8, 20_000, 3) and got.nbytes > (1 << 20)
    backend = server.runtime.models["seq"].backend
    import torch

    want, _ = backend.predict(torch.from_numpy(u), backend.rate_for(None))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    last = httpx.post(f"{server.url}/v1/models/seq/predict", content=_npy(u),
                      params={"outputs": "last"}, headers=headers, timeout=120)
    np.testing.assert_allclose(np.load(io.BytesIO(last.content)), got[:, -1:], atol=1e-5)
    small = httpx.post(f"{server.url}/v1/models/seq/predict", content=_npy(u[:1, :10]),
                       headers=headers, timeout=120)
    assert small.status_code == 200 and np.load(io.BytesIO(small.content)).shape == (1, 10, 3)
