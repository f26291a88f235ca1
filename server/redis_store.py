"""A session store in Redis (`S4SERVE_STORE=redis://host:port/db`), shared by every worker and
replica, so that a session dropped on one resumes on any other.

Records are JSON under `s4serve:session:<sha256(token)>` with a TTL (`SET ... PX`); `take` is
one atomic GETDEL, so of two replicas racing for a token at most one gets it, and Redis
expires what nobody takes. When Redis cannot be reached, records go to the local directory
store instead (logged) and `take` looks there too, so a Redis outage costs resumability across
replicas, never the session itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict

import redis

from server.store import LocalDirectoryStore, SessionRecord, SessionStore

log = logging.getLogger("s4serve.store")
PREFIX = "s4serve:session:"


class RedisStore(SessionStore):
    def __init__(self, url: str, fallback: LocalDirectoryStore, timeout: float = 2.0) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
        self.fallback = fallback

    @staticmethod
    def key(token: str) -> str:
        # tokens are client-supplied: hashed, they can never reach another key
        return PREFIX + hashlib.sha256(token.encode()).hexdigest()

    def put(self, token: str, record: SessionRecord, ttl: float) -> None:
        try:
            self.client.set(self.key(token), json.dumps(asdict(record)),
                            px=max(1, int(ttl * 1000)))
        except redis.RedisError as exc:
            log.error("redis store unavailable (%s): session kept in the local store", exc)
            self.fallback.put(token, record, ttl)

    def take(self, token: str) -> SessionRecord | None:
        try:
            raw = self.client.getdel(self.key(token))
        except redis.RedisError as exc:
            log.error("redis store unavailable (%s): looking in the local store", exc)
            raw = None
        if raw is None:
            return self.fallback.take(token)
        return SessionRecord(**json.loads(raw))

    def purge_expired(self) -> int:
        return self.fallback.purge_expired()  # Redis expires its own keys
