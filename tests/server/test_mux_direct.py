"""server/mux_direct.py over real sockets: a gateway's tick (the same sessions, one sample
each) taken straight from the transport (`express`) has the numbers of `predict`; any message
that is not the last one's sessions in the same order goes the usual way, and so do messages
after the connection's sessions changed."""

from __future__ import annotations

import numpy as np
import pytest

from client import AsyncClient
from server.mux_direct import DirectPath
from tests.server.client import predict


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
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        sids = [await m.open() for _ in inputs]
        order = list(range(4))
        for t in range(30):
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
    # ticks 1-9, 11-19 and 21-29 went straight; the first of each order did not
    assert taken[0] is False and taken.count(True) >= 24


async def test_a_bad_entry_in_a_straight_tick_is_rejected_alone(server, taken):
    u = signal(6, 70)
    expected = np.array(predict(server.url, "seq", u[None])["outputs"])[0]
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a, b = await m.open(), await m.open()
        outs = []
        for t in range(3):
            outs.append((await m.send({a: u[t:t + 1], b: u[t:t + 1]}))[a])
        before = taken.count(True)
        nan = np.array([[np.nan, 1.0]], np.float32)
        reply = await m.send({a: u[3:4], b: nan})  # a tick's shape: taken straight
        assert taken.count(True) == before + 1
        assert reply[b].code == "non_finite" and reply[a].shape == (1, 3)
        outs.append(reply[a])
        assert (await m.snapshot(b))[0] == 3 and (await m.snapshot(a))[0] == 4
        two = await m.send({a: u[4:6], b: u[3:5]})  # two samples each: the usual way
        outs.append(two[a])
        assert (await m.snapshot(b))[0] == 5
    np.testing.assert_allclose(np.concatenate(outs), expected, atol=1e-4)


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
