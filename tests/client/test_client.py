"""The client library against a real server: HTTP calls, streams, and streams that lose their
connection (closed by the server, reset, or cut by a network that swallows replies) and still
hand the caller every output exactly once."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from client import AsyncClient, Client, ClientError, StreamError
from tests.server.conftest import ServerThread, make_settings


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    settings = make_settings(model_dirs, tmp_path_factory.mktemp("client"))
    with ServerThread(settings) as running:
        yield running


@pytest.fixture(scope="module")
def ringless(model_dirs, tmp_path_factory):
    """A server that keeps no replies to send again (reply_ring_bytes 0)."""
    settings = make_settings(model_dirs, tmp_path_factory.mktemp("ringless"),
                             reply_ring_bytes=0, step_compiler="torchscript")
    with ServerThread(settings) as running:
        yield running


def signal(length: int, seed: int = 0, channels: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((length, channels)).astype(np.float32)


def test_sync_client_models_predict_and_stream(server):
    u = signal(40)
    with Client(server.url) as c:
        assert {m["name"] for m in c.models()} == {"seq", "cls"}
        assert c.model("seq")["d_input"] == 2
        binary = c.predict("seq", u[None]).outputs
        as_json = c.predict("seq", u[None], binary=False)
        np.testing.assert_allclose(binary, as_json.outputs, atol=1e-6)
        assert binary.shape == (1, 40, 3)
        with pytest.raises(ClientError) as err:
            c.predict("seq", np.zeros((1, 4, 5), np.float32))
        assert (err.value.status, err.value.code) == (400, "bad_shape")
        with c.stream("seq") as s:
            assert s.info["d_output"] == 3
            got = [s.send(u[:1])] + [s.send(u[i:i + 3]) for i in range(1, 40, 3)]
    np.testing.assert_allclose(np.concatenate(got), binary[0], atol=1e-4)


def test_sync_client_mux(server):
    u, v = signal(12), signal(12)[::-1].copy()
    with Client(server.url) as c:
        expected = c.predict("seq", np.stack([u, v])).outputs
        with c.mux("seq") as m:
            a, b = m.open(), m.open()
            assert set(m.sessions) == {a, b}
            got = [m.send({a: u[i:i + 1], b: v[i:i + 1]}) for i in range(6)]
            samples, token = m.snapshot(a)
            assert samples == 6 and token
            got += [m.send({a: u[i:i + 3], b: v[i:i + 3]}) for i in (6, 9)]
            assert m.end(b) == 12
            m.reset(a)
            again = m.send({a: u[:1]})[a]
    np.testing.assert_allclose(np.concatenate([g[a] for g in got]), expected[0], atol=1e-4)
    np.testing.assert_allclose(np.concatenate([g[b] for g in got]), expected[1], atol=1e-4)
    np.testing.assert_allclose(again, expected[0, :1], atol=1e-4)


async def test_prefill_then_stream_snapshot_reset_and_errors(server):
    u = signal(30, seed=1)
    async with AsyncClient(server.url) as c:
        expected = (await c.predict("seq", u[None])).outputs[0]
        head = await c.predict("seq", u[None, :10], return_state=True)
        async with c.stream("seq", state=head.state[0]) as s:
            assert s.info["samples"] == 10
            tail = await s.send(u[10:])
            np.testing.assert_allclose(tail, expected[10:], atol=1e-4)
            with pytest.raises(StreamError) as err:
                await s.send(np.array([[np.nan, 0]], np.float32))
            assert err.value.code == "non_finite" and err.value.seq == 1
            samples, blob = await s.snapshot()
            assert samples == 30 and blob
            await s.reset()
            again = await s.send(u[:5])
        np.testing.assert_allclose(again, expected[:5], atol=1e-4)
        async with c.stream("seq", output="last") as s:
            last = await s.send(u[:7])
        np.testing.assert_allclose(last, expected[6:7], atol=1e-4)


class Cutter:
    """A TCP proxy between client and server that can cut the line: `blackhole()` stops
    forwarding the server's bytes (replies in flight are lost), `cut()` resets both sides."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.swallow = False
        self.reject = False  # new connections are closed before the HTTP upgrade
        self.drop_up = False  # the client's bytes are lost on the way

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _link(self, reader, writer) -> None:
        if self.reject:  # a server or proxy restarting: accepted, closed at once
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.links.append((writer, up_writer))

        async def pipe(src, dst, down: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if not (self.swallow if down else self.drop_up):
                        dst.write(data)
                        await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def cut(self) -> None:
        for a, b in self.links:
            for w in (a, b):
                w.transport.abort()
        self.links.clear()
        self.swallow = self.drop_up = False

    async def stop(self) -> None:
        self.server.close()


@pytest.mark.parametrize("lose_replies,ring", [(False, True), (True, True), (True, False)],
                         ids=["cut", "replies-lost", "replies-lost-no-ring"])
async def test_stream_survives_a_cut_line(request, lose_replies, ring):
    """Replies the network swallowed come again from the server's reply ring (same session,
    nothing replayed); a server without one makes the client start over from its recovery
    point and replay. The caller gets every output once either way."""
    server = request.getfixturevalue("server" if ring else "ringless")
    u = signal(300, seed=2)
    async with AsyncClient(server.url) as plain:
        expected = (await plain.predict("seq", u[None])).outputs[0]
    cutter = Cutter(int(server.url.rsplit(":", 1)[1]))
    url = await cutter.start()
    got = []
    async with AsyncClient(url) as c, c.stream("seq", checkpoint_s=0.05) as s:
        for i in range(0, 150, 5):
            got.append(await s.send(u[i:i + 5]))
        first = s.info["session"]
        await asyncio.sleep(0.06)  # a checkpoint is due with the next frame
        cutter.swallow = lose_replies
        for i in range(150, 200, 5):  # sent, computed, replies swallowed (or not)
            await s.feed(u[i:i + 5])
        await asyncio.sleep(0.3)
        cutter.cut()
        for i in range(200, 300, 5):
            await s.feed(u[i:i + 5])
        while len(got) < 60:
            got.append(await asyncio.wait_for(s.recv(), 30))
        assert s.reconnects >= 1
        if ring:
            assert s.info["session"] == first and s.replayed == 0
        else:  # started over from its last snapshot (what it replays depends on when that was)
            assert s.info["session"] != first
    await cutter.stop()
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


async def test_stream_resumes_after_the_server_closes_it(server):
    u = signal(60, seed=3)
    async with AsyncClient(server.url) as c:
        expected = (await c.predict("seq", u[None])).outputs[0]
        async with c.stream("seq") as s:
            got = [await s.send(u[:20])]
            token = s.info["resume_token"]
            session = server.runtime.manager.live[token]
            loop = server.runtime.scheduler._loop  # the server runs in its own thread
            loop.call_soon_threadsafe(session.owner.kick, 1011, "internal")
            await asyncio.sleep(0.3)
            got.append(await s.send(u[20:]))
            assert s.reconnects == 1
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)


@pytest.mark.parametrize("lose_replies", [False, True])
async def test_mux_survives_a_cut_line(server, lose_replies):
    inputs = [signal(120, seed=10 + i) for i in range(4)]
    fed = [u[::2] if i < 2 else u for i, u in enumerate(inputs)]  # what each session gets
    async with AsyncClient(server.url) as plain:
        expected = [(await plain.predict("seq", u[None])).outputs[0] for u in fed]
    cutter = Cutter(int(server.url.rsplit(":", 1)[1]))
    url = await cutter.start()
    got: list[list[np.ndarray]] = [[] for _ in inputs]
    async with AsyncClient(url) as c, c.mux("seq", checkpoint_s=0.05) as m:
        sids = [await m.open() for _ in inputs]

        def frames(t: int, size: int) -> dict:  # sessions 0 and 1 one sample, 2 and 3 more
            return {sid: inputs[i][t:t + (1 if i < 2 else size)] for i, sid in enumerate(sids)}

        for t in range(0, 40, 2):
            replies = await m.send(frames(t, 2))
            for i, sid in enumerate(sids):
                got[i].append(replies[sid])
        await asyncio.sleep(0.06)  # checkpoints are due with the next message
        cutter.swallow = lose_replies
        pending = [asyncio.ensure_future(m.send(frames(t, 2))) for t in range(40, 60, 2)]
        await asyncio.sleep(0.3)
        cutter.cut()
        pending += [asyncio.ensure_future(m.send(frames(t, 2))) for t in range(60, 120, 2)]
        for reply in await asyncio.wait_for(asyncio.gather(*pending), 30):
            for i, sid in enumerate(sids):
                got[i].append(reply[sid])
        assert m.reconnects >= 1 and sorted(m.sessions) == sorted(sids)
        assert (await m.snapshot(sids[0]))[0] == 60 and (await m.snapshot(sids[3]))[0] == 120
    await cutter.stop()
    for i in range(4):
        np.testing.assert_allclose(np.concatenate(got[i]), expected[i], atol=1e-4)


async def test_mux_replays_again_after_a_drop_during_its_recovery(server):
    """Replies lost, then the line cut: the session is restarted from its recovery point and
    its entries replayed; a second cut before that replay is answered replays it again."""
    u = signal(30, seed=40)
    async with AsyncClient(server.url) as plain:
        expected = (await plain.predict("seq", u[None])).outputs[0]
    cutter = Cutter(int(server.url.rsplit(":", 1)[1]))
    url = await cutter.start()
    async with AsyncClient(url) as c, c.mux("seq", checkpoint_s=0) as m:
        a = await m.open()
        head = (await m.send({a: u[:10]}))[a]
        cutter.swallow = True  # the next reply is lost: the server is ahead of the client
        pending = asyncio.ensure_future(m.send({a: u[10:15]}))
        await asyncio.sleep(0.3)
        send, cut = m._send_data, []

        async def cut_during_replay(message, ws=None):
            if message.future is None and not cut:  # the recovery's replay: cut again
                cut.append(message)
                (ws or m._ws).transport.abort()
            return await send(message, ws)

        m._send_data = cut_during_replay
        cutter.cut()
        mid = (await asyncio.wait_for(pending, 30))[a]
        tail = (await m.send({a: u[15:]}))[a]
        assert cut and m.reconnects >= 2
        assert (await m.snapshot(a))[0] == 30
    await cutter.stop()
    np.testing.assert_allclose(np.concatenate([head, mid, tail]), expected, atol=1e-4)


async def test_mux_calls_waiting_on_a_session_taken_over_raise(server):
    async with AsyncClient(server.url) as c, c.mux("seq") as m:
        a = await m.open()
        token = m.sessions[a]["resume_token"]
        long = signal(40_000, seed=41)
        work = [asyncio.ensure_future(m.send({a: long})) for _ in range(8)]
        snapshot = asyncio.ensure_future(m.snapshot(a))  # queued behind the long entries
        await asyncio.sleep(0.02)
        async with c.stream("seq", resume=token) as taker:  # takes the session over
            assert taker.info["samples"] < 8 * 40_000
            with pytest.raises(StreamError):
                await asyncio.wait_for(snapshot, 10)
        for reply in await asyncio.wait_for(asyncio.gather(*work), 10):
            assert isinstance(reply[a], StreamError | np.ndarray)


async def test_stream_replays_from_a_checkpoint_after_the_server_is_killed(model_dirs, tmp_path):
    """SIGKILL of the server (a real `s4serve serve`), restarted on the same port and session
    directory: the stream resumes from the last checkpoint by itself, replays the frames since,
    and the caller gets every output once, equal to predict."""
    import signal as signals

    from tests.server.conftest import free_port
    from tests.server.test_shutdown import launch

    u = signal(200, seed=7)
    port, sessions = free_port(), tmp_path / "sessions"
    options = dict(CHECKPOINT_INTERVAL="0.2", STEP_COMPILER="torchscript")
    process = launch(model_dirs["seq"], port, sessions, "--workers", "1", **options)
    got = []
    try:
        async with AsyncClient(f"http://127.0.0.1:{port}") as c:
            expected = (await c.predict("seq", u[None])).outputs[0]
            async with c.stream("seq", checkpoint_s=60) as s:  # no snapshots of its own
                first = s.info["session"]
                for i in range(0, 100, 5):
                    got.append(await s.send(u[i:i + 5]))
                await asyncio.sleep(0.6)  # checkpointed at 100
                for i in range(100, 130, 5):
                    got.append(await s.send(u[i:i + 5]))  # answered, not checkpointed
                process.send_signal(signals.SIGKILL)
                process.wait(10)
                process = launch(model_dirs["seq"], port, sessions, "--workers", "1",
                                 **options)
                for i in range(130, 200, 5):
                    await s.feed(u[i:i + 5])
                while len(got) < 40:
                    got.append(await asyncio.wait_for(s.recv(), 60))
                assert s.reconnects == 1
                # resumed (same session) from a checkpoint behind the outputs received
                assert s.info["session"] == first and 100 <= s.info["samples"] <= 130
    finally:
        process.kill()
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4)
