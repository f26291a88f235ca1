"""The HTTP API over a real socket: health, models, predict (JSON and .npy) and its errors."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from tests.server.client import predict

NPY = "application/x-npy"


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_health_readiness_and_models(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready", "models": ["cls", "seq"]}
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    cls = models["cls"]
    assert cls["layer"] == "s4" and cls["task"] == "classification"
    assert (cls["d_input"], cls["d_output"], cls["labels"]) == (1, 3, ["low", "mid", "high"])
    assert cls["state_bytes"] > 0 and cls["device"] == "cpu" and cls["backend"] == "torch"
    assert httpx.get(server.url + "/v1/models/seq").json() == models["seq"]
    missing = httpx.get(server.url + "/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_predict_json_shapes_outputs_last_and_2d_inputs(server):
    u = np.random.default_rng(0).standard_normal((2, 30)).astype(np.float32)
    full = predict(server.url, "cls", u)  # (batch, length) accepted when d_input == 1
    assert np.array(full["outputs"]).shape == (2, 30, 3)
    assert full["labels"] == ["low", "mid", "high"] and full["state"] is None
    assert full["model"] == "cls" and full["version"] == "1" and full["device"] == "cpu"
    assert full["timing_ms"]["compute"] >= 0
    last = predict(server.url, "cls", u[:, :, None], outputs="last")
    np.testing.assert_allclose(np.array(last["outputs"])[:, 0], np.array(full["outputs"])[:, -1],
                               atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", ">f4", ">i2"])
def test_predict_npy_in_and_out(server, dtype):
    """Little- and big-endian files alike: the .npy header names the byte order."""
    rng = np.random.default_rng(1)
    if "i" in dtype:
        u = rng.integers(-3000, 3000, size=(1, 25, 2)).astype(dtype)
        as_float = u / 32768.0
    else:
        u = rng.standard_normal((1, 25, 2)).astype(dtype)
        as_float = u
    reference = np.array(predict(server.url, "seq", as_float)["outputs"])
    answer = httpx.post(server.url + "/v1/models/seq/predict?outputs=all", content=npy(u),
                        headers={"content-type": NPY, "accept": NPY})
    assert answer.status_code == 200 and answer.headers["content-type"] == NPY
    got = np.load(io.BytesIO(answer.content))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_return_state_continues_exactly(server):
    u = np.random.default_rng(2).standard_normal((2, 50, 2)).astype(np.float32)
    whole = np.array(predict(server.url, "seq", u)["outputs"])
    head = predict(server.url, "seq", u[:, :20], return_state=True)
    assert len(head["state"]) == 2
    tail = predict(server.url, "seq", u[:, 20:], state=head["state"])
    np.testing.assert_allclose(np.array(tail["outputs"]), whole[:, 20:], atol=1e-4)


def post(server, body: bytes | str, content_type="application/json", path="seq/predict"):
    return httpx.post(f"{server.url}/v1/models/{path}", content=body,
                      headers={"content-type": content_type})


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        ("{broken", "application/json", 400, "bad_request"),
        ('{"inputs": [[[1, 2, 3]]]}', "application/json", 400, "bad_shape"),
        ('{"inputs": [[[1, 2], [3]]]}', "application/json", 400, "bad_shape"),
        ('{"inputs": [[]]}', "application/json", 400, "bad_shape"),
        ('{"inputs": [[["a", "b"]]]}', "application/json", 400, "bad_dtype"),
        ('{"inputs": [[[NaN, 1]]]}', "application/json", 400, "non_finite"),
        ('{"inputs": [[[1%s, 1]]]}' % ("0" * 400), "application/json", 400, "non_finite"),
        ('{"inputs": [[[1%s, 1], [1]]]}' % ("0" * 30), "application/json", 400, "bad_shape"),
        ('{"inputs": [[[1, 2]]], "state": ["AAAA"]}', "application/json", 400, "bad_state"),
        ('{"inputs": [[[1, 2]]], "state": []}', "application/json", 400, "bad_state"),
        ('{"inputs": [[[1, 2]]], "sample_rate": -1}', "application/json", 400, "bad_request"),
        ("inputs=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"not npy", NPY, 400, "bad_request"),
        (npy(np.zeros((1, 3, 2), np.int32)), NPY, 400, "bad_dtype"),
        (npy(np.zeros((1, 3, 5), np.float32)), NPY, 400, "bad_shape"),
    ],
)
def test_predict_errors(server, body, content_type, status, code):
    answer = post(server, body, content_type)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert answer.json()["error"]["message"]


def test_a_compressed_body_is_refused_as_such(server):
    answer = httpx.post(f"{server.url}/v1/models/seq/predict", content=b"\x1f\x8b\x08\x00",
                        headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert answer.status_code == 415
    assert "Content-Encoding 'gzip'" in answer.json()["error"]["message"]


def test_predict_schema_violations_are_422_and_unknown_model_404(server):
    for body in ('{"inputs": [[[1, 2]]], "outputs": "some"}', '{"x": 1}'):
        answer = post(server, body)
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request"
    assert post(server, '{"inputs": [[[1]]]}', path="nope/predict").status_code == 404


def test_state_of_another_model_is_rejected(server):
    blob = predict(server.url, "cls", np.zeros((1, 4)), return_state=True)["state"]
    answer = post(server, f'{{"inputs": [[[1, 2]]], "state": ["{blob[0]}"]}}')
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_state"
