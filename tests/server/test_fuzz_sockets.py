"""Fuzzing over real sockets: hypothesis drives a stream session with random messages, and
schemathesis drives the HTTP API from its own OpenAPI schema. Every input gets its reply or a
close frame with a code, never a dropped connection; every HTTP error has the documented body;
the session's state stays finite and usable."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import schemathesis
import websockets
from hypothesis import given
from hypothesis import strategies as st

from server.state_blob import decode_state
from tests import fuzz_budget  # noqa: F401  (the examples budget)
from tests.server.client import connect, start

words = st.sampled_from(["start", "samples", "snapshot", "reset", "end", "x", ""])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | words,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "data", "dtype", "state", "resume", "sample_rate", "q"]),
        inner, max_size=4),
    max_leaves=20,
)
messages = st.one_of(
    st.binary(max_size=64),
    st.lists(st.floats(width=32), min_size=2, max_size=16).map(
        lambda xs: np.asarray(xs[: len(xs) // 2 * 2], "<f4").tobytes() or b"\0" * 8),
    json_values.map(json.dumps),
    st.builds(lambda t, d: json.dumps({"type": t, "data": d}), words, json_values),
)


async def _session(ws_url: str, sent: list) -> None:
    async with await connect(ws_url, "seq") as ws:
        assert (await start(ws))["type"] == "started"
        for message in sent:
            await ws.send(message)
            reply = await asyncio.wait_for(ws.recv(), 10)
            if isinstance(reply, str):
                body = json.loads(reply)
                assert body["type"] != "error" or (body["code"] and body["message"])
                if body["type"] == "end":
                    return
        await ws.send(np.zeros((1, 2), "<f4").tobytes())  # the session still works ...
        out = np.frombuffer(await asyncio.wait_for(ws.recv(), 10), "<f4")
        assert out.shape == (3,) and np.isfinite(out).all()
        await ws.send(json.dumps({"type": "snapshot"}))  # ... and its state is finite
        snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
        record = decode_state(snapshot["state"])
        assert all(np.isfinite(t).all() for t in record.tensors)


@given(st.lists(messages, min_size=1, max_size=12))
def test_random_messages_never_drop_a_session(server, sent):
    try:
        asyncio.run(_session(server.ws_url, sent))
    except websockets.ConnectionClosed as closed:  # allowed only as a close with a code
        assert closed.rcvd is not None and closed.rcvd.code in (1000, 1008, 1009), closed


@schemathesis.serializer("application/x-npy")
def _npy(ctx, value) -> bytes:  # the schema says binary: send whatever bytes were drawn
    return value if isinstance(value, bytes) else str(value).encode()


def test_every_http_answer_is_documented(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any("predict" in op.path for op in operations)
    seen: list = []
    for operation in operations:

        @given(operation.as_strategy())
        def check(case):
            response = case.call(timeout=30)
            seen.append(case.path)
            assert response.status_code < 500, (case.path, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str)

        check()
    assert sum("predict" in path for path in seen) >= 10  # the body really was fuzzed


def test_the_server_is_still_healthy_after_the_fuzzing(server):
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
