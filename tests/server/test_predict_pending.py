"""Predict requests are counted from the start of their upload to the end of their answer, so
stalled uploads cannot hold server memory past `max_pending_requests`; a request that finds no
predict worker free in time is answered instead of waiting for good."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import numpy as np
import pytest

from server.errors import ServeError
from server.predict_job import Job, Limits
from server.predict_worker import PredictPool
from tests.server.conftest import ServerThread, make_settings


def _stalled_upload(port: int) -> socket.socket:
    """A predict whose body stops after its first bytes (the connection stays open)."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(b"POST /v1/models/seq/predict HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
                 + b'{"inputs": [[' + b"0.0, " * 1000)
    return conn


def test_uploads_in_progress_count_against_max_pending_requests(model_dirs, tmp_path):
    settings = make_settings(model_dirs, tmp_path, max_pending_requests=2)
    with ServerThread(settings) as server:
        port = int(server.url.rsplit(":", 1)[1])
        stalled = [_stalled_upload(port) for _ in range(2)]
        body = {"inputs": np.zeros((1, 5, 2)).tolist()}
        for _ in range(100):  # until the server has started reading both
            refused = httpx.post(server.url + "/v1/models/seq/predict", json=body, timeout=30)
            if refused.status_code == 503:
                break
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        for conn in stalled:  # the clients give up: their places are free again
            conn.close()
        for _ in range(100):
            answered = httpx.post(server.url + "/v1/models/seq/predict", json=body, timeout=30)
            if answered.status_code == 200:
                break
        assert answered.status_code == 200
        for _ in range(100):  # the stalled uploads' ends and the answer's are seen by now
            if server.runtime.pending_requests == 0:
                break
            time.sleep(0.05)
        assert server.runtime.pending_requests == 0


def _answer_of(conn: socket.socket) -> bytes:
    """A whole HTTP answer with a JSON body, read from a raw connection."""
    conn.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        answer += conn.recv(4096)
    return answer


def test_an_upload_that_stalls_is_answered_408_and_frees_its_place(model_dirs, tmp_path):
    """No bytes for body_timeout: 408 body_timeout, the connection closed, and its place among
    max_pending_requests given back at once (the next predict is answered while the stalled
    client still holds its socket). An upload that is slow but keeps sending is not cut off."""
    settings = make_settings(model_dirs, tmp_path, max_pending_requests=1, body_timeout=0.5)
    with ServerThread(settings) as server:
        port = int(server.url.rsplit(":", 1)[1])
        stalled = _stalled_upload(port)
        began = time.perf_counter()
        answer = _answer_of(stalled)
        assert 0.4 < time.perf_counter() - began < 5
        assert answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer
        assert b"connection: close" in answer.lower()
        body = {"inputs": np.zeros((1, 5, 2)).tolist()}
        answered = httpx.post(server.url + "/v1/models/seq/predict", json=body, timeout=30)
        assert answered.status_code == 200
        stalled.close()
        payload = json.dumps(body).encode()
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/models/seq/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), len(payload) // 5 + 1):  # 6 pieces over ~1.5 s
            slow.sendall(payload[i:i + len(payload) // 5 + 1])
            time.sleep(0.25)
        assert _answer_of(slow).startswith(b"HTTP/1.1 200")
        slow.close()


async def test_no_free_predict_worker_within_the_timeout_is_overloaded(model_dirs,
                                                                       monkeypatch):
    monkeypatch.setattr("server.predict_worker._MIN_WAIT_S", 0.2)
    pool = PredictPool([model_dirs["seq"]], "cpu", 8, Limits(1 << 20), size=0, timeout=0.05)
    with pytest.raises(ServeError) as err:
        await asyncio.wait_for(pool.run(Job("seq", b"{}", "application/json")), 5)
    assert err.value.code == "overloaded"
