"""WS /v1/models/{name}/mux over real sockets: many sessions on one connection with the
numbers of dedicated streams, per-entry errors that leave every state alone, resume across
mux and plain streams, limits, auth."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
import websockets

from client import AsyncClient, StreamError
from client.wire import HEADER, encode_data
from server.mux_table import Handle
from tests.server.client import connect, predict, start, stream_binary
from tests.server.conftest import ServerThread, make_settings


def signal(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((length, 2)).astype(np.float32)


async def test_sessions_on_one_connection_equal_their_own_streams(server):
    inputs = [signal(40, seed) for seed in range(5)]
    expected = [np.array(predict(server.url, "seq", u[None])["outputs"])[0] for u in inputs]
    got: list[list[np.ndarray]] = [[] for _ in inputs]
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        sids = [await m.open() for _ in inputs]
        assert len(set(sids)) == 5 and m.sessions[sids[0]]["d_output"] == 3
        at = [0] * 5
        rng = np.random.default_rng(0)
        while min(at) < 40:
            frames = {}
            for i, sid in enumerate(sids):  # any subset, any frame length, per message
                if at[i] < 40 and rng.random() < 0.7:
                    size = int(rng.integers(1, 9))
                    frames[sid] = inputs[i][at[i]:at[i] + size]
                    at[i] += len(frames[sid])
            replies = await m.send(frames)
            assert list(replies) == list(frames)  # same order
            for i, sid in enumerate(sids):
                if sid in replies:
                    got[i].append(replies[sid])
        samples, blob = await m.snapshot(sids[0])
        assert samples == 40 and blob
        assert await m.end(sids[1]) == 40
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.concatenate(have), want, atol=1e-4)


async def test_bad_entries_are_rejected_alone(server):
    u = signal(6, 7)
    expected = np.array(predict(server.url, "seq", u[None])["outputs"])[0]
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a, b = await m.open(), await m.open()
        first = await m.send({a: u[:3], b: np.array([[np.nan, 0.0]], np.float32)})
        assert first[a].shape == (3, 3)
        assert isinstance(first[b], StreamError) and first[b].code == "non_finite"
        overflow = await m.send({b: np.full((5, 2), 3e38, np.float32), a: u[3:]})
        assert overflow[b].code == "non_finite" and overflow[a].shape == (3, 3)
        unknown = await m.send_raw([(a, b"", 0), (999, b"\0" * 8, 1)])
        assert unknown[0][1].code == "bad_shape" and unknown[1][1].code == "unknown_session"
        assert (await m.snapshot(b))[0] == 0  # every rejected entry left b alone
        samples, _ = await m.snapshot(a)
        assert samples == 6
        np.testing.assert_allclose(np.concatenate([first[a], overflow[a]]), expected,
                                   atol=1e-4)


async def test_mux_sessions_resume_on_streams_and_muxes(server):
    u = signal(30, 9)
    expected = np.array(predict(server.url, "seq", u[None])["outputs"])[0]
    async with AsyncClient(server.url) as c:
        async with c.mux("seq") as m:
            a, b = await m.open(), await m.open()
            tokens = {sid: m.sessions[sid]["resume_token"] for sid in (a, b)}
            head = await m.send({a: u[:10], b: u[:20]})
            assert await m.detach(a) == 10
        # a: detached on purpose, resumed on a plain stream; b: its connection just went away
        async with await connect(server.ws_url, "seq") as ws:
            assert (await start(ws, resume=tokens[a]))["samples"] == 10
            tail_a = await stream_binary(ws, [u[10:]], 3)
        async with c.mux("seq") as m:
            b2 = await m.open(resume=tokens[b])
            assert m.sessions[b2]["samples"] == 20
            tail_b = (await m.send({b2: u[20:]}))[b2]
    np.testing.assert_allclose(np.concatenate([head[a], tail_a]), expected, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([head[b], tail_b]), expected, atol=1e-4)


async def test_a_stream_takes_a_session_over_from_a_mux(server):
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a, b = await m.open(), await m.open()
        await m.send({a: signal(4, 1), b: signal(4, 2)})
        async with await connect(server.ws_url, "seq") as ws:
            started = await start(ws, resume=m.sessions[a]["resume_token"])
            assert started["samples"] == 4
            replies = await m.send({b: signal(2, 3)})  # the mux and its other session go on
            assert replies[b].shape == (2, 3)
        assert m._closed_sessions == {a: "resumed_elsewhere"}


@pytest.fixture(scope="module")
def small(model_dirs, tmp_path_factory):
    settings = make_settings(model_dirs, tmp_path_factory.mktemp("mux"), mux_max_sessions=2,
                             mux_max_entries=3, api_keys=["k"])
    with ServerThread(settings) as running:
        yield running


async def test_limits_and_auth(small):
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with websockets.connect(small.ws_url + "/v1/models/seq/mux") as ws:
            await ws.recv()
    assert closed.value.rcvd.code == 1008
    async with AsyncClient(small.url, token="k") as c, c.mux("seq") as m:
        await m.open()
        await m.open()
        with pytest.raises(StreamError) as err:
            await m.open()
        assert err.value.code == "too_many_sessions"
        with pytest.raises(StreamError) as err:
            await m.send_raw([(1, b"\0" * 8, 1)] * 4)
        assert err.value.code == "bad_request"
    key = {"Authorization": "Bearer k"}
    async with websockets.connect(small.ws_url + "/v1/models/seq/mux",
                                  additional_headers=key) as ws:
        await ws.send(struct.pack("<BB", 9, 9))  # not even a header
        assert json.loads(await ws.recv())["code"] == "bad_request"
        await ws.send(encode_data(5, []))  # and the connection goes on
        assert HEADER.unpack_from(await ws.recv())[3] == 5


def _mux_messages(url: str, path: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("s4serve_mux_messages_total{") and f'path="{path}"' in line)


async def test_one_sample_messages_are_batched_with_the_same_numbers(server):
    inputs = [signal(12, 20 + i) for i in range(6)]
    expected = [np.array(predict(server.url, "seq", u[None])["outputs"])[0] for u in inputs]
    got: list[list[np.ndarray]] = [[] for _ in inputs]
    batched, per_entry = _mux_messages(server.url, "batched"), _mux_messages(server.url,
                                                                           "per_entry")
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        sids = [await m.open() for _ in inputs]
        for t in range(10):  # one sample per session: the batched path, pipelined
            replies = await asyncio.gather(*(m.send({sid: inputs[i][t:t + 1]})
                                             for i, sid in enumerate(sids)))
            whole = await m.send({sid: inputs[i][t + 1:t + 2] for i, sid in enumerate(sids)
                                  if t == 9})
            for i, reply in enumerate(replies):
                got[i].append(reply[sids[i]])
            for i, sid in enumerate(sids):
                if sid in whole:
                    got[i].append(whole[sid])
        # a NaN among one-sample entries: rejected in the batched step, the others advance;
        # then the per-entry path: a session twice
        nan = np.array([[np.nan, 0.0]], np.float32)
        mixed = await m.send({sids[0]: nan, sids[1]: inputs[1][11:12]})
        assert mixed[sids[0]].code == "non_finite" and mixed[sids[1]].shape == (1, 3)
        got[1].append(mixed[sids[1]])
        twice = await m.send_raw([(sids[0], inputs[0][11].tobytes(), 1),
                                  (sids[0], inputs[0][11].tobytes(), 1)])
        assert [sid for sid, _ in twice] == [sids[0], sids[0]]
        got[0].append(twice[0][1])
        assert (await m.snapshot(sids[0]))[0] == 13 and (await m.snapshot(sids[2]))[0] == 11
    for i in (0, 1):
        np.testing.assert_allclose(np.concatenate(got[i])[:12], expected[i], atol=1e-4)
    for i in range(2, 6):
        np.testing.assert_allclose(np.concatenate(got[i]), expected[i][:11], atol=1e-4)
    assert _mux_messages(server.url, "batched") - batched >= 60
    assert _mux_messages(server.url, "per_entry") - per_entry >= 2


async def test_a_failed_step_answers_each_entry_internal_and_changes_no_state(server,
                                                                               monkeypatch):
    """The step of a batched message raises: every entry is answered `internal`, no session
    advanced, and the connection goes on."""
    def failing(*args, **kwargs):
        def call(*_):
            raise RuntimeError("the step failed")
        return call

    u = signal(2, 40)
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a, b = await m.open(), await m.open()
        with monkeypatch.context() as patch:
            patch.setattr(server.runtime.models["seq"].pool.backend, "rows_call", failing)
            failed = await m.send({a: u[0:1], b: u[0:1]})
        assert failed[a].code == "internal" and failed[b].code == "internal"
        assert (await m.snapshot(a))[0] == 0 and (await m.snapshot(b))[0] == 0
        await m.detach(b)  # a new list of ids: a new route, its step prepared afresh
        assert (await m.send({a: u[0:1]}))[a].shape == (1, 3)
        assert (await m.snapshot(a))[0] == 1


async def test_close_and_end_come_after_the_entries_sent_before_them(server):
    u = signal(8, 30)
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a, b = await m.open(), await m.open()
        sent = [m.send({a: u[i:i + 1], b: u[i:i + 1]}) for i in range(8)]
        replies, closed, ended = await asyncio.gather(asyncio.gather(*sent), m.detach(a),
                                                      m.end(b))
        assert closed == 8 and ended == 8
        assert all(r[a].shape == (1, 3) and r[b].shape == (1, 3) for r in replies)


async def test_replies_are_binary_whatever_the_first_session_id(server):
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        sids = [await m.open() for _ in range(130)]
        assert 123 in sids  # its answer header starts with the byte of "{"
        reply = await m.send({123: signal(2, 1)})
        assert reply[123].shape == (2, 3)
        reply = await m.send({123: signal(1, 2)})
        assert reply[123].shape == (1, 3)


@pytest.fixture(scope="module")
def gathering(model_dirs, tmp_path_factory):
    """A step that gathers and scatters rows (the native step advances them where they lie)."""
    settings = make_settings(model_dirs, tmp_path_factory.mktemp("gather"),
                             step_compiler="torchscript")
    with ServerThread(settings) as running:
        yield running


@pytest.mark.parametrize("where", ["in_place", "gathered"])
async def test_sessions_opened_interleaved_keep_their_numbers(where, server, gathering):
    """Two gateways open their sessions alternately, so each one's rows interleave with the
    other's. Gathered: a batch's rows are moved into one run (to step as a view); in place:
    rows stay where they are and every due batch steps in one call. Either way, a plain stream,
    snapshots and the per-entry path go on around them with their numbers."""
    server = server if where == "in_place" else gathering
    assert server.runtime.models["seq"].pool.in_place == (where == "in_place")
    inputs = [signal(16, 40 + i) for i in range(8)]
    plain = signal(16, 60)
    expected = [np.array(predict(server.url, "seq", u[None])["outputs"])[0]
                for u in [*inputs, plain]]
    pool = server.runtime.models["seq"].pool
    got: list[list[np.ndarray]] = [[] for _ in range(9)]
    async with AsyncClient(server.url) as c, c.mux("seq") as a, c.mux("seq") as b, \
            c.stream("seq") as s:
        ids_a, ids_b = [], []
        for _ in range(4):
            ids_a.append(await a.open())
            ids_b.append(await b.open())
        mine = {0: (a, ids_a), 1: (b, ids_b)}  # inputs 0-3 on a, 4-7 on b
        for t in range(16):
            for g, (m, ids) in mine.items():
                order = ids if t % 2 else ids[::-1]  # the entries' order changes too
                replies = await m.send({sid: inputs[4 * g + ids.index(sid)][t:t + 1]
                                        for sid in order})
                for sid in ids:
                    got[4 * g + ids.index(sid)].append(replies[sid])
            got[8].append(await s.send(plain[t:t + 1]))
            if t == 7:
                assert (await a.snapshot(ids_a[0]))[0] == 8
        rows = _rows_by_connection(server)
    assert len(rows) == 2
    for slots in rows if where == "gathered" else ():  # each one's sessions: one run now
        assert sorted(slots) == list(range(min(slots), min(slots) + 4)), rows
    assert pool.in_use == 0
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.concatenate(have), want, atol=1e-4)


def _rows_by_connection(server) -> list[list[int]]:
    """The state rows of the live mux sessions, per connection."""
    rows: dict[int, list[int]] = {}
    for session in server.runtime.manager.live.values():
        if isinstance(session.owner, Handle):
            rows.setdefault(id(session.owner.conn), []).append(session.stream.slot)
    return list(rows.values())


async def test_controls_pipelined_between_messages_keep_their_place(server):
    """Messages, snapshots and resets sent without waiting for each other: a message stepped
    at once (nothing of its connection queued) and one queued behind earlier work answer
    alike, and every control sees exactly the samples sent before it."""
    u = signal(24, 70)
    after_reset = np.array(predict(server.url, "seq", u[None, 12:])["outputs"])[0]
    whole = np.array(predict(server.url, "seq", u[None, :12])["outputs"])[0]
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a, b = await m.open(), await m.open()
        sent, controls = [], []
        go = asyncio.ensure_future  # started in this order: each is written in its first step
        for t in range(24):
            if t == 12:
                controls.append(go(m.reset(a)))
            sent.append(go(m.send({a: u[t:t + 1], b: u[t:t + 1]})))
            if t % 5 == 4:
                controls.append(go(m.snapshot(b)))
        replies = await asyncio.gather(*sent)
        done = await asyncio.gather(*controls)
        assert [d[0] for d in done if d is not None] == [5, 10, 15, 20]
        assert (await m.snapshot(a))[0] == 12
    got_a = np.concatenate([r[a] for r in replies])
    np.testing.assert_allclose(got_a[:12], whole, atol=1e-4)
    np.testing.assert_allclose(got_a[12:], after_reset, atol=1e-4)
