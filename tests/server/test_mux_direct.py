"""server/mux_direct.py over real sockets: a gateway's tick (the same sessions, one sample
each) taken straight from the transport (`express`) has the numbers of `predict` and is
counted as a batched message; any message that is not the last one's sessions in the same
order, with the same count, goes the usual way, and so do messages after the connection's
sessions changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import websockets

from client import AsyncClient
from client.wire import HEADER, decode_outputs, encode_data
from server.mux_direct import DirectPath
from tests.server.client import predict
from tests.server.test_mux import _mux_messages


def signal(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((length, 2)).astype(np.float32)


@pytest.fixture
def taken(monkeypatch) -> list[bool]:
    """What `express` answered, message by message (the server runs in this process)."""
    answers: list[bool] = []
    express = DirectPath.express

    def counted(self, payload: bytes) -> bool:
        answers.append(express(self, payload))
        return answers[-1]

    monkeypatch.setattr(DirectPath, "express", counted)
    return answers


async def test_a_gateways_ticks_are_taken_straight_and_equal_predict(server, taken):
    inputs = [signal(30, 60 + i) for i in range(4)]
    expected = [np.array(predict(server.url, "seq", u[None])["outputs"])[0] for u in inputs]
    got: list[list[np.ndarray]] = [[] for _ in inputs]
    batched = _mux_messages(server.url, "batched")
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        sids = [await m.open() for _ in inputs]
        order = list(range(4))
        for t in range(30):  # one message at a time: each arrives alone in a read
            if t == 10:
                order = [2, 0, 3, 1]  # the same sessions in another order: a new route
            elif t == 20:
                order = [0, 1, 2, 3]
            reply = await m.send({sids[i]: inputs[i][t:t + 1] for i in order})
            assert list(reply) == [sids[i] for i in order]
            for i in order:
                got[i].append(reply[sids[i]])
        assert (await m.snapshot(sids[3]))[0] == 30
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.concatenate(have), want, atol=1e-4)
    # the first message of each order found another route, the rest went straight
    assert taken == ([False] + [True] * 9) * 3
    assert _mux_messages(server.url, "batched") - batched == 30


async def test_a_bad_entry_in_a_straight_tick_is_rejected_alone(server, taken):
    u = signal(6, 70)
    expected = np.array(predict(server.url, "seq", u[None])["outputs"])[0]
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a, b = await m.open(), await m.open()
        outs = []
        for t in range(3):
            outs.append((await m.send({a: u[t:t + 1], b: u[t:t + 1]}))[a])
        nan = np.array([[np.nan, 1.0]], np.float32)
        reply = await m.send({a: u[3:4], b: nan})  # a tick's shape: taken straight
        assert taken[-1] is True
        assert reply[b].code == "non_finite" and reply[a].shape == (1, 3)
        outs.append(reply[a])
        assert (await m.snapshot(b))[0] == 3 and (await m.snapshot(a))[0] == 4
        two = await m.send({a: u[4:6], b: u[3:5]})  # two samples each: the usual way
        assert taken[-1] is False
        outs.append(two[a])
        assert (await m.snapshot(b))[0] == 5
    np.testing.assert_allclose(np.concatenate(outs), expected, atol=1e-4)


async def test_a_tick_with_another_count_in_its_header_is_refused_whole(server, taken):
    """The same bytes as a tick but for the header's entry count: not stepped straight; the
    usual path reads it by its count and answers as it always does (nothing applied)."""
    u = signal(3, 75)
    async with websockets.connect(server.ws_url + "/v1/models/seq/mux") as ws:
        sids = []
        for _ in range(2):
            await ws.send(json.dumps({"type": "open"}))
            sids.append(json.loads(await ws.recv())["sid"])
        tick = encode_data(1, [(sid, u[0].tobytes(), 1) for sid in sids])
        for seq in (1, 2):
            await ws.send(tick[:4] + seq.to_bytes(4, "little") + tick[8:])
            assert decode_outputs(await ws.recv(), 3)[0] == seq
        assert taken == [False, True]
        for count in (1, 3, 0):
            await ws.send(tick[:8] + count.to_bytes(4, "little") + tick[12:])
            reply = await ws.recv()
            assert taken[-1] is False
            if count == 3:  # its two entries applied; the third, past the end: bad_shape
                assert HEADER.unpack_from(reply)[4] == 3
                assert [e[1] for e in decode_outputs(reply, 3)[1]] == [0, 0, 2]
            else:  # bytes left past its entries: the whole message refused, nothing applied
                assert json.loads(reply)["code"] == "bad_request"
        await ws.send(json.dumps({"type": "snapshot", "sid": sids[0]}))
        assert json.loads(await ws.recv())["samples"] == 3  # two ticks and count 3's first


async def test_after_a_session_leaves_its_tick_goes_the_usual_way(server, taken):
    u = signal(4, 80)
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a, b = await m.open(), await m.open()
        for t in range(2):
            await m.send({a: u[t:t + 1], b: u[t:t + 1]})
        assert taken[-1] is True
        assert await m.end(b) == 2
        reply = await m.send_raw([(a, u[2].tobytes(), 1), (b, u[2].tobytes(), 1)])
        assert taken[-1] is False  # the connection's sessions changed: no straight route
        assert reply[0][1].shape == (1, 3) and reply[1][1].code == "unknown_session"
        assert (await m.snapshot(a))[0] == 3
