"""The mux connection's order of replies and its errors, seen on the raw socket: a control's
reply keeps its place after the replies to the entries sent before it, controls stranded
behind an `end` are answered, malformed text and data messages are refused alone, and resumes
in flight count against the session limit."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from client.wire import HEADER, KIND_OUTPUTS, decode_outputs, encode_data
from tests.server.conftest import ServerThread, make_settings

LONG = 40_000  # samples: an entry that takes many rounds


def mux(server):
    return websockets.connect(server.ws_url + "/v1/models/seq/mux", max_size=None)


async def ask(ws, message: dict) -> dict:
    await ws.send(json.dumps(message))
    return json.loads(await ws.recv())


def samples(count: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).standard_normal((count, 2)).astype("<f4").tobytes()


async def replies(ws, count: int) -> list:
    """The next `count` messages: ('data', seq, statuses) or the JSON of a text reply."""
    got = []
    for _ in range(count):
        message = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(message, bytes):
            assert HEADER.unpack_from(message)[1] == KIND_OUTPUTS
            seq, entries = decode_outputs(message, 3)
            got.append(("data", seq, [status for _, status, _ in entries]))
        else:
            got.append(json.loads(message))
    return got


async def test_a_control_reply_follows_the_replies_to_earlier_entries(server):
    async with mux(server) as ws:
        a = (await ask(ws, {"type": "open"}))["sid"]
        b = (await ask(ws, {"type": "open"}))["sid"]
        # a's entry is done at once, b's takes many rounds: a's reset applies right away,
        # but its reply must not overtake the reply to the message holding a's entry
        await ws.send(encode_data(1, [(a, samples(1), 1), (b, samples(LONG), LONG)]))
        await ws.send(json.dumps({"type": "reset", "sid": a}))
        await ws.send(json.dumps({"type": "snapshot", "sid": b}))
        first, reset, snapshot = await replies(ws, 3)
        assert first == ("data", 1, [0, 0])
        assert reset == {"type": "reset", "sid": a, "samples": 0}
        assert snapshot["type"] == "snapshot" and snapshot["samples"] == LONG


async def test_controls_stranded_behind_an_end_are_answered(server):
    async with mux(server) as ws:
        a = (await ask(ws, {"type": "open"}))["sid"]
        await ws.send(encode_data(1, [(a, samples(LONG), LONG)]))
        for kind in ("end", "snapshot", "reset"):
            await ws.send(json.dumps({"type": kind, "sid": a}))
        data, end, snapshot, reset = await replies(ws, 4)
        assert data == ("data", 1, [0]) and end == {"type": "end", "sid": a, "samples": LONG}
        for reply in (snapshot, reset):
            assert reply["code"] == "unknown_session" and reply["sid"] == a
        c = (await ask(ws, {"type": "open"}))["sid"]  # the connection goes on
        await ws.send(encode_data(2, [(c, samples(1), 1)]))
        assert await replies(ws, 1) == [("data", 2, [0])]


async def test_errors_for_controls_keep_their_place_after_earlier_data(server):
    """A control for a session already gone (or any bad control) is answered after the replies
    to the data sent before it, not ahead of them."""
    async with mux(server) as ws:
        a = (await ask(ws, {"type": "open"}))["sid"]
        b = (await ask(ws, {"type": "open"}))["sid"]
        assert (await ask(ws, {"type": "end", "sid": a}))["type"] == "end"
        await ws.send(encode_data(7, [(b, samples(LONG), LONG)]))
        await ws.send(json.dumps({"type": "reset", "sid": a}))  # a has ended
        await ws.send(json.dumps({"type": "rewind", "sid": b}))  # no such control
        await ws.send(json.dumps({"type": "reset", "sid": b}))
        data, gone, unknown, reset = await replies(ws, 4)
        assert data == ("data", 7, [0])
        assert gone["code"] == "unknown_session" and gone["sid"] == a
        assert unknown["code"] == "unknown_type" and unknown["sid"] == b
        assert reset == {"type": "reset", "sid": b, "samples": 0}


@pytest.mark.parametrize("sid", [[1], {"a": 1}, True, "1", 1.0, None])
async def test_a_malformed_sid_is_a_bad_request_and_nothing_else(server, sid):
    async with mux(server) as ws:
        a = (await ask(ws, {"type": "open"}))["sid"]
        reply = await ask(ws, {"type": "snapshot", "sid": sid})
        assert reply["type"] == "error" and reply["code"] in ("bad_request", "unknown_session")
        if sid is not None:
            assert reply["code"] == "bad_request"
        assert (await ask(ws, {"type": "snapshot", "sid": a}))["samples"] == 0


async def test_a_message_holding_more_than_its_count_is_refused_whole(server):
    async with mux(server) as ws:
        a = (await ask(ws, {"type": "open"}))["sid"]
        b = (await ask(ws, {"type": "open"}))["sid"]
        both = encode_data(1, [(a, samples(3), 3), (b, samples(2), 2)])
        miscounted = both[:8] + (1).to_bytes(4, "little") + both[12:]  # says 1 entry
        await ws.send(miscounted)
        reply = json.loads(await ws.recv())
        assert reply["code"] == "bad_request" and reply["seq"] == 1
        for sid in (a, b):  # nothing of it was applied
            assert (await ask(ws, {"type": "snapshot", "sid": sid}))["samples"] == 0


async def test_resumes_in_flight_count_against_the_session_limit(model_dirs, tmp_path):
    settings = make_settings(model_dirs, tmp_path, mux_max_sessions=2, resume_wait=2.0)
    with ServerThread(settings) as server:
        async with mux(server) as ws:
            opened = await ask(ws, {"type": "open"})
            token = opened["resume_token"]
            assert (await ask(ws, {"type": "end", "sid": opened["sid"]}))["type"] == "end"
            # an ended session's token: each resume waits resume_wait for a record to appear
            for ref in ("r1", "r2"):
                await ws.send(json.dumps({"type": "open", "ref": ref, "resume": token}))
            third = await ask(ws, {"type": "open", "ref": "r3"})
            assert third["code"] == "too_many_sessions" and third["ref"] == "r3"
            late = await replies(ws, 2)
            assert sorted(r["ref"] for r in late) == ["r1", "r2"]
            assert {r["code"] for r in late} == {"resume_not_found"}
            assert (await ask(ws, {"type": "open"}))["type"] == "opened"  # room again


async def test_a_resume_refused_for_want_of_a_slot_keeps_the_session(model_dirs, tmp_path):
    settings = make_settings(model_dirs, tmp_path, max_sessions=1, resume_wait=0.0)
    with ServerThread(settings) as server:
        async with mux(server) as ws:
            a = await ask(ws, {"type": "open"})
            await ws.send(encode_data(1, [(a["sid"], samples(7), 7)]))
            await replies(ws, 1)
            closed = await ask(ws, {"type": "close", "sid": a["sid"]})
            assert closed["samples"] == 7
            b = await ask(ws, {"type": "open"})  # the only slot
            refused = await ask(ws, {"type": "open", "resume": a["resume_token"]})
            assert refused["code"] == "overloaded"
            assert (await ask(ws, {"type": "end", "sid": b["sid"]}))["type"] == "end"
            again = await ask(ws, {"type": "open", "resume": a["resume_token"]})
            assert again["type"] == "opened" and again["samples"] == 7


async def test_a_store_failure_while_a_resume_waits_is_answered(model_dirs, tmp_path):
    settings = make_settings(model_dirs, tmp_path, resume_wait=2.0)
    with ServerThread(settings) as server:
        store, calls = server.runtime.store, []

        def failing_take(token):  # not there yet, then the disk fails
            calls.append(token)
            if len(calls) == 1:
                return None
            raise OSError(28, "No space left on device")

        store.take = failing_take
        async with mux(server) as ws:
            reply = await asyncio.wait_for(
                ask(ws, {"type": "open", "ref": "x", "resume": "t" * 32}), 10)
            assert reply["code"] == "internal" and reply["ref"] == "x" and len(calls) >= 2
            assert (await ask(ws, {"type": "open"}))["type"] == "opened"  # the mux goes on
