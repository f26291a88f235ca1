"""The client's bookkeeping under faults a review found it getting wrong: a session taken over
by token, a replay cut short, refused and reset entries, a server that refuses while it
restarts, and close() or a silent server while calls wait. Each test failed before its fix."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from websockets.asyncio.server import serve

from client import AsyncClient, StreamError
from client.wire import frame_bytes
from tests.client.test_client import Cutter, server, signal  # noqa: F401
from tests.server.conftest import ServerThread, make_settings


async def expected_outputs(server, u: np.ndarray) -> np.ndarray:  # noqa: F811
    async with AsyncClient(server.url) as plain:
        return (await plain.predict("seq", u[None])).outputs[0]


async def proxied(server) -> tuple[Cutter, str]:  # noqa: F811
    cutter = Cutter(int(server.url.rsplit(":", 1)[1]))
    return cutter, await cutter.start()


async def test_a_stream_taken_over_by_token_counts_replies_as_the_server_does(server):  # noqa: F811
    """The new owner's reply count starts at the session's (the server's `replies`), so a
    later drop resumes at the right reply, not at the first owner's."""
    u = signal(25, seed=3)
    expected = await expected_outputs(server, u)
    cutter, url = await proxied(server)
    async with AsyncClient(url) as c:
        first = c.stream("seq", checkpoint_s=1000)
        await first.open()
        got = [await first.send(u[:5])]
        token = first.info["resume_token"]
        await first.close()
        second = c.stream("seq", resume=token, checkpoint_s=1000)
        await second.open()
        got += [await second.send(u[5:10]), await second.send(u[10:15])]
        cutter.drop_up = True  # the next frame is lost with the line
        await second.feed(u[15:20])
        await asyncio.sleep(0.2)
        cutter.cut()
        got.append(await asyncio.wait_for(second.recv(), 20))
        got.append(await asyncio.wait_for(second.send(u[20:25]), 20))
        assert second.reconnects == 1 and (await second.snapshot())[0] == 25
        await second.close()
    await cutter.stop()
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


class _Nowhere:
    async def send(self, _: object) -> None:  # a message lost with the line
        return None


async def test_mux_replay_cut_after_its_first_reply_is_finished(server):  # noqa: F811
    """A replay whose first message was answered and whose rest died with the line: the next
    recovery replays the rest (answered replays no longer lower what the client received)."""
    u = signal(25, seed=5)
    expected = await expected_outputs(server, u)
    cutter, url = await proxied(server)
    async with AsyncClient(url) as c, c.mux("seq", checkpoint_s=0) as m:
        a = await m.open()
        got = [(await m.send({a: u[i:i + 5]}))[a] for i in (0, 5, 10)]
        cutter.swallow = True  # this reply is lost: the server is ahead, the session restarts
        pending = asyncio.ensure_future(m.send({a: u[15:20]}))
        await asyncio.sleep(0.3)
        send, outputs = m._send_data, m._on_outputs
        armed, replays = [True], [0]

        async def send_data(message, ws=None):
            if armed[0] and message.future is None:
                replays[0] += 1
                if replays[0] > 1:
                    return await send(message, _Nowhere())
            if armed[0] and message.future is not None and replays[0]:
                return await send(message, _Nowhere())
            return await send(message, ws)

        def on_outputs(message):
            head = m._data[0] if m._data else None
            outputs(message)
            if armed[0] and head is not None and head.future is None:
                armed[0] = False  # the first replay answered: the line drops
                m._ws.transport.abort()

        m._send_data, m._on_outputs = send_data, on_outputs
        cutter.cut()
        got.append((await asyncio.wait_for(pending, 20))[a])
        got.append((await asyncio.wait_for(m.send({a: u[20:25]}), 20))[a])
        assert replays[0] > 1 and (await m.snapshot(a))[0] == 25
    await cutter.stop()
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


@pytest.fixture(scope="module")
def few_entries(model_dirs, tmp_path_factory):
    """A server refusing mux messages of more than 4 entries."""
    with ServerThread(make_settings(model_dirs, tmp_path_factory.mktemp("few"),
                                    mux_max_entries=4, step_compiler="torchscript")) as running:
        yield running


async def send_after_a_cut(cutter, m, sid: int, frame: np.ndarray, samples: int) -> np.ndarray:
    """Cut the line, send `frame` on the mux (it reconnects once) and check that the session's
    state then holds `samples`; its outputs."""
    cutter.cut()
    out = (await asyncio.wait_for(m.send({sid: frame}), 20))[sid]
    assert m.reconnects == 1 and (await m.snapshot(sid))[0] == samples
    return out


async def test_mux_message_refused_whole_moves_no_session_forward(few_entries):
    u = signal(3, seed=7)
    expected = await expected_outputs(few_entries, u)
    cutter, url = await proxied(few_entries)
    async with AsyncClient(url) as c, c.mux("seq", checkpoint_s=1e-9) as m:
        a = await m.open()
        got = [(await m.send({a: u[0:1]}))[a]]
        with pytest.raises(StreamError) as refused:
            await m.send_raw([(a, frame_bytes(u[2:3]), 1)] * 5)  # past mux_max_entries
        assert refused.value.code == "bad_request" and m._state[a].sent == 1
        got.append((await m.send({a: u[1:2]}))[a])
        await m.snapshot(a)
        got.append(await send_after_a_cut(cutter, m, a, u[2:3], 3))
    await cutter.stop()
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


async def test_mux_entries_sent_while_a_reset_is_answered_start_at_zero(server):  # noqa: F811
    u = signal(6, seed=9)
    expected = await expected_outputs(server, u[3:])
    cutter, url = await proxied(server)
    async with AsyncClient(url) as c, c.mux("seq", checkpoint_s=1e-9) as m:
        a = await m.open()
        await m.send({a: u[0:3]})
        reset = asyncio.ensure_future(m.reset(a))
        tick = asyncio.ensure_future(m.send({a: u[3:4]}))  # another task's tick, meanwhile
        await reset
        got = [(await tick)[a], (await m.send({a: u[4:5]}))[a]]
        assert m._state[a].sent == 2
        got.append(await send_after_a_cut(cutter, m, a, u[5:6], 3))
    await cutter.stop()
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


async def test_reconnects_go_on_past_a_server_that_closes_before_the_upgrade(server):  # noqa: F811
    u = signal(10, seed=11)
    cutter, url = await proxied(server)
    async with AsyncClient(url) as c, c.stream("seq") as s, c.mux("seq") as m:
        a = await m.open()
        await s.send(u[:5])
        await m.send({a: u[:1]})
        cutter.reject = True
        cutter.cut()
        await asyncio.sleep(0.5)  # reconnect attempts refused meanwhile
        cutter.reject = False
        assert (await asyncio.wait_for(s.send(u[5:10]), 20)).shape == (5, 3)
        assert (await asyncio.wait_for(m.send({a: u[1:2]}), 20))[a].shape == (1, 3)
        assert s.reconnects >= 1 and m.reconnects >= 1
    await cutter.stop()


async def test_mux_close_during_a_reconnect_returns(server):  # noqa: F811
    cutter, url = await proxied(server)
    async with AsyncClient(url) as c:
        m = c.mux("seq")
        await m.__aenter__()
        a = await m.open()
        await m.send({a: signal(1)})
        cutter.reject = True  # the reconnect keeps failing until close()
        cutter.cut()
        await asyncio.sleep(0.3)
        waiting = asyncio.ensure_future(m.send({a: signal(1)}))
        await asyncio.wait_for(m.close(), 5)
        with pytest.raises(StreamError):
            await asyncio.wait_for(waiting, 5)
    await cutter.stop()


async def test_close_wakes_a_waiting_recv_and_a_silent_server_leaves_no_socket(server):  # noqa: F811
    async with AsyncClient(server.url) as c:
        s = c.stream("seq")
        await s.open()
        await s.send(signal(1))
        waiting = asyncio.ensure_future(s.recv())
        await asyncio.sleep(0.1)
        await s.close()
        with pytest.raises(StreamError) as closed:
            await asyncio.wait_for(waiting, 5)
        assert closed.value.code == "closed"
    held = set()

    async def silent(ws) -> None:  # upgrades, reads `start`, never answers
        held.add(ws)
        try:
            await ws.wait_closed()
        finally:
            held.discard(ws)

    async with serve(silent, "127.0.0.1", 0) as quiet:
        port = quiet.sockets[0].getsockname()[1]
        async with AsyncClient(f"http://127.0.0.1:{port}") as quiet_client:
            s = quiet_client.stream("seq", open_timeout=0.5)
            with pytest.raises(StreamError) as timed_out:
                await s.open()
        assert timed_out.value.code == "timeout"
        await asyncio.sleep(0.5)
        assert not held  # the client closed what it opened


async def test_predict_takes_int16_as_the_wire_does_and_names_the_device(server):  # noqa: F811
    samples = np.random.default_rng(13).integers(-3000, 3000, (2, 20, 2)).astype(np.int16)
    async with AsyncClient(server.url) as c:
        floats = await c.predict("seq", samples / 32768.0)
        for binary in (True, False):  # .npy carries int16; JSON gets it scaled by the client
            got = await c.predict("seq", samples, binary=binary)
            np.testing.assert_allclose(got.outputs, floats.outputs, atol=1e-5)
            assert got.device == "cpu"


async def test_mux_control_errors_answer_the_oldest_control_of_their_session(server):  # noqa: F811
    """Errors name no kind: with a snapshot, an unknown control and a snapshot in flight, the
    error goes to the unknown one and both snapshots are answered."""
    async with AsyncClient(server.url) as c, c.mux("seq", reconnect=False) as m:
        a = await m.open()
        await m.send({a: signal(3)})
        first, odd, second = await asyncio.gather(
            m._ask("snapshot", a), m._ask("rewind", a), m._ask("snapshot", a),
            return_exceptions=True)
        assert first["samples"] == 3 and second["samples"] == 3
        assert isinstance(odd, StreamError) and odd.code == "unknown_type"
