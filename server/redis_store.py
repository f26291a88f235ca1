"""A session store in Redis (`S4SERVE_STORE=redis://host:port/db`), shared by every worker and
replica, so that a session dropped on one resumes on any other.

Records (server/store.py `pack_record`) live under `s4serve:session:<sha256(token)>:<epoch>`
with a TTL, the owner's epoch under `s4serve:epoch:<sha256(token)>`, as the local store lays
them out in files. A write of many records is one pipelined round trip of plain SETs followed
by one MGET of their epochs (Redis runs a connection's commands in order, so the MGET sees
every take that could have missed a SET). `take` is one Lua script, hence atomic. When Redis
cannot be reached, records go to the local directory store instead (logged) and `take` looks
there too, so a Redis outage costs resumability across replicas, never the session itself.
"""

from __future__ import annotations

import logging

import redis

from server.local_store import LocalDirectoryStore
from server.store import (
    SessionRecord,
    SessionStore,
    pack_record,
    token_hash,
    unpack_record,
)

log = logging.getLogger("s4serve.store")
PREFIX = "s4serve:session:"
EPOCH_PREFIX = "s4serve:epoch:"
EPOCH_KEEP_MS = 3_600_000  # an epoch outlives its records; each write refreshes it

# KEYS: epoch. ARGV: record key prefix, epoch ttl ms. Returns {new epoch, record} or nil
_TAKE = """
local epoch = tonumber(redis.call('GET', KEYS[1]) or '0')
local key = ARGV[1] .. epoch
local record = redis.call('GET', key)
if not record then return nil end
redis.call('DEL', key)
redis.call('SET', KEYS[1], epoch + 1, 'PX', ARGV[2])
return {epoch + 1, record}
"""


class RedisStore(SessionStore):
    def __init__(self, url: str, fallback: LocalDirectoryStore, timeout: float = 2.0) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
        self.fallback = fallback
        self._local_epochs: dict[str, int] = {}  # token: its local epoch, while it falls back
        self._take = self.client.register_script(_TAKE)

    def put_many(self, items: list[tuple[str, SessionRecord, int]], ttl: float) -> list[bool]:
        if not items:
            return []
        ttl_ms = max(1, int(ttl * 1000))
        try:
            pipe = self.client.pipeline(transaction=False)
            epochs = []
            for token, record, epoch in items:
                digest = token_hash(token)
                pipe.set(f"{PREFIX}{digest}:{epoch}", pack_record(record), px=ttl_ms)
                if epoch:
                    pipe.pexpire(EPOCH_PREFIX + digest, EPOCH_KEEP_MS)
                epochs.append(EPOCH_PREFIX + digest)
            pipe.mget(epochs)
            now = pipe.execute()[-1]
        except redis.RedisError as exc:
            log.error("redis store unavailable (%s): %d sessions kept in the local store",
                      exc, len(items))
            return self._fall_back(items, ttl)
        if self._local_epochs:  # reached again: these write to Redis from now on
            for token, _, _ in items:
                self._local_epochs.pop(token, None)
        return [int(current or 0) == epoch
                for current, (_, _, epoch) in zip(now, items, strict=True)]

    def _fall_back(self, items: list[tuple[str, SessionRecord, int]],
                   ttl: float) -> list[bool]:
        """Records kept in the local store while Redis cannot be reached, under the local
        store's epoch of each token as it was at the session's first such write (a local take
        finds them there, and moves it on: the owner's next write is then refused). Redis
        epochs mean nothing to the local store: written under them, every session resumed
        at least once was refused and cut off by a Redis outage."""
        local = []
        for token, record, _ in items:
            epoch = self._local_epochs.get(token)
            if epoch is None:
                epoch = self._local_epochs[token] = self.fallback.epoch_of(token)
            local.append((token, record, epoch))
        return self.fallback.put_many(local, ttl)

    def take(self, token: str) -> SessionRecord | None:
        digest = token_hash(token)
        try:
            got = self._take(keys=[EPOCH_PREFIX + digest],
                             args=[f"{PREFIX}{digest}:", EPOCH_KEEP_MS])
        except redis.RedisError as exc:
            log.error("redis store unavailable (%s): looking in the local store", exc)
            got = None
        if got is None:
            return self.fallback.take(token)
        epoch, raw = got
        return unpack_record(raw, int(epoch))[0]

    def forget(self, token: str, epoch: int) -> None:
        try:
            self.client.delete(f"{PREFIX}{token_hash(token)}:{epoch}")
        except redis.RedisError as exc:
            log.error("redis store unavailable (%s): an ended session's checkpoint stays "
                      "until it expires", exc)
        self.fallback.forget(token, self._local_epochs.pop(token, epoch))

    def purge_expired(self) -> int:
        return self.fallback.purge_expired()  # Redis expires its own keys
