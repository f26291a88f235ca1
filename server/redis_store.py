"""A session store in Redis (`S4SERVE_STORE=redis://host:port/db`), shared by every worker and
replica, so that a session dropped on one resumes on any other.

Records are JSON under `s4serve:session:<sha256(token)>` with a TTL, the owner's epoch under
`s4serve:epoch:<sha256(token)>`. Each operation is one Lua script, so it is atomic: `take` reads
and deletes the record and moves the epoch on; `put` writes only while the epoch is the
writer's. Checkpoints of many sessions go in one pipelined round trip. When Redis cannot be
reached, records go to the local directory store instead (logged) and `take` looks there too,
so a Redis outage costs resumability across replicas, never the session itself.
"""

from __future__ import annotations

import hashlib
import json
import logging

import redis

from server.store import LocalDirectoryStore, SessionRecord, SessionStore, record_json

log = logging.getLogger("s4serve.store")
PREFIX = "s4serve:session:"
EPOCH_PREFIX = "s4serve:epoch:"
EPOCH_KEEP_MS = 3_600_000  # an epoch outlives its record; each put refreshes it

# KEYS: record, epoch. ARGV: writer's epoch, record JSON, ttl ms, epoch ttl ms
_PUT = """
local current = redis.call('GET', KEYS[2])
if current and tonumber(current) ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if current then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return 1
"""
# KEYS: record, epoch. ARGV: epoch ttl ms. Returns {epoch, record} or nil
_TAKE = """
local record = redis.call('GET', KEYS[1])
if not record then return nil end
redis.call('DEL', KEYS[1])
local epoch = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return {epoch, record}
"""
# KEYS: record, epoch. ARGV: owner's epoch
_FORGET = """
local current = redis.call('GET', KEYS[2])
if current and tonumber(current) ~= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


class RedisStore(SessionStore):
    def __init__(self, url: str, fallback: LocalDirectoryStore, timeout: float = 2.0) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
        self.fallback = fallback
        self._put = self.client.register_script(_PUT)
        self._take = self.client.register_script(_TAKE)
        self._forget = self.client.register_script(_FORGET)

    @staticmethod
    def _keys(token: str) -> list[str]:
        # tokens are client-supplied: hashed, they can never reach another key
        digest = hashlib.sha256(token.encode()).hexdigest()
        return [PREFIX + digest, EPOCH_PREFIX + digest]

    def put(self, token: str, record: SessionRecord, ttl: float, epoch: int = 0) -> bool:
        return self.put_many([(token, record, epoch)], ttl)[0]

    def put_many(self, items: list[tuple[str, SessionRecord, int]], ttl: float) -> list[bool]:
        ttl_ms = max(1, int(ttl * 1000))
        try:
            pipe = self.client.pipeline(transaction=False)
            for token, record, epoch in items:
                self._put(keys=self._keys(token), client=pipe,
                          args=[epoch, record_json(record), ttl_ms, EPOCH_KEEP_MS])
            return [bool(ok) for ok in pipe.execute()]
        except redis.RedisError as exc:
            log.error("redis store unavailable (%s): %d sessions kept in the local store",
                      exc, len(items))
            return self.fallback.put_many(items, ttl)

    def take(self, token: str) -> SessionRecord | None:
        try:
            got = self._take(keys=self._keys(token), args=[EPOCH_KEEP_MS])
        except redis.RedisError as exc:
            log.error("redis store unavailable (%s): looking in the local store", exc)
            got = None
        if got is None:
            return self.fallback.take(token)
        epoch, raw = got
        return SessionRecord(**{**json.loads(raw), "epoch": int(epoch)})

    def forget(self, token: str, epoch: int) -> None:
        try:
            self._forget(keys=self._keys(token), args=[epoch])
        except redis.RedisError as exc:
            log.error("redis store unavailable (%s): an ended session's checkpoint stays "
                      "until it expires", exc)
        self.fallback.forget(token, epoch)

    def purge_expired(self) -> int:
        return self.fallback.purge_expired()  # Redis expires its own keys
