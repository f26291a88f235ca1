"""The Redis session store against a real redis-server (started here): atomic take, TTL,
the local fallback when Redis is away, and a session dropped on one server resuming on
another that shares the store."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import websockets

from loadtest.cluster import metric, redis_server
from server.local_store import LocalDirectoryStore
from server.redis_store import RedisStore
from server.store import SessionRecord
from tests.server.client import connect, predict, start, stream_binary
from tests.server.conftest import ServerThread, free_port, make_settings


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server (tests/system-deps.sh installs it), one per test module."""
    with redis_server(tmp_path_factory.mktemp("r")) as url:
        yield url


def record(samples: int = 5) -> SessionRecord:
    return SessionRecord("id", "seq", "float32", None, "every", samples, b"blob")


def taken(item: SessionRecord, epoch: int = 1) -> SessionRecord:
    return SessionRecord(**{**item.__dict__, "epoch": epoch})


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_one_owner_per_session_by_epoch(redis_url, tmp_path, kind):
    """A take moves the epoch on: writes of the previous owner are refused from then on, the
    new owner's go through, and an end (forget) by the previous owner removes nothing."""
    local = LocalDirectoryStore(tmp_path)
    store = local if kind == "local" else RedisStore(redis_url, local)
    assert store.put("own", record(1), ttl=30)  # a new session: epoch 0
    assert store.take("own") == taken(record(1))
    assert not store.put("own", record(2), ttl=30, epoch=0)  # the old owner is fenced
    assert store.put_many([("own", record(3), 1), ("other", record(4), 0)], ttl=30) == [
        True, True]
    store.forget("own", 0)  # not the owner: nothing happens
    assert store.take("own") == taken(record(3), 2)
    assert store.put("own", record(5), ttl=30, epoch=2)
    store.forget("own", 2)
    assert store.take("own") is None


def test_put_take_once_and_expire(redis_url, tmp_path):
    store = RedisStore(redis_url, LocalDirectoryStore(tmp_path))
    store.put("tok", record(), ttl=30)
    assert store.take("tok") == taken(record())
    assert store.take("tok") is None  # taken: gone
    store.put("short", record(), ttl=0.2)
    time.sleep(0.4)
    assert store.take("short") is None  # expired by Redis itself
    store.put("secret-token", record(), ttl=30)
    keys = [k.decode() for k in store.client.keys("*")]
    assert keys and not any("secret-token" in k for k in keys)  # tokens are hashed


def test_of_many_concurrent_takes_exactly_one_wins(redis_url, tmp_path):
    store = RedisStore(redis_url, LocalDirectoryStore(tmp_path))
    store.put("race", record(), ttl=30)
    got, barrier = [], threading.Barrier(16)

    def take():
        barrier.wait()
        got.append(RedisStore(redis_url, LocalDirectoryStore(tmp_path)).take("race"))

    threads = [threading.Thread(target=take) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in got) == 1


def test_without_redis_sessions_go_to_the_local_store(tmp_path):
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", LocalDirectoryStore(tmp_path),
                       timeout=0.5)
    store.put("tok", record(7), ttl=30)
    assert store.take("tok") == taken(record(7))


async def test_a_session_dropped_on_one_server_resumes_on_another(model_dirs, redis_url,
                                                                  tmp_path):
    """Dropped on A, resumed on B from Redis; then presented on A again while B holds it
    live: B lets go at once (1008 `resumed_elsewhere`) and hands over its exact state, with
    no checkpoint to fall back on (checkpoints off)."""
    u = np.random.default_rng(3).standard_normal((60, 2)).astype(np.float32)
    settings_a = make_settings(model_dirs, tmp_path / "a", store=redis_url,
                               checkpoint_interval=0)
    settings_b = make_settings(model_dirs, tmp_path / "b", store=redis_url,
                               checkpoint_interval=0)
    with ServerThread(settings_a) as a, ServerThread(settings_b) as b:
        expected = np.array(predict(a.url, "seq", u[None])["outputs"])[0]
        async with await connect(a.ws_url, "seq") as ws:
            token = (await start(ws))["resume_token"]
            head = await stream_binary(ws, [u[:30]], 3)
        await asyncio.sleep(0.3)  # A detaches the dropped session into Redis
        async with await connect(b.ws_url, "seq") as ws:
            resumed = await start(ws, resume=token)
            assert resumed["type"] == "started" and resumed["samples"] == 30
            tail = await stream_binary(ws, [u[30:45]], 3)
            async with await connect(a.ws_url, "seq") as again:
                back = await start(again, resume=token)
                assert back["type"] == "started" and back["samples"] == 45, back
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert (ws.close_code, ws.close_reason) == (1008, "resumed_elsewhere")
                rest = await stream_binary(again, [u[45:]], 3)
        assert metric(a.url, "s4serve_handoffs_total") == 1
    np.testing.assert_allclose(np.concatenate([head, tail, rest]), expected, atol=1e-4)



def test_without_redis_a_resumed_session_is_kept_and_fenced_locally(tmp_path):
    """A session resumed at least once writes under a Redis epoch the local store does not
    know: kept there all the same (it was refused, and its session cut off, by any outage),
    found by a local take, and its owner refused after that take."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", LocalDirectoryStore(tmp_path),
                       timeout=0.5)
    assert store.put("tok", record(7), ttl=30, epoch=3)
    assert store.put("tok", record(8), ttl=30, epoch=3)
    assert store.take("tok").samples == 8
    assert not store.put("tok", record(9), ttl=30, epoch=3)  # taken meanwhile: fenced
