"""Taking over a session that is live on another replica sharing the Redis store.

A replica asked to resume a token it does not hold publishes a release request on
`s4serve:release`; every other replica (and worker) subscribed there answers on the asker's
own channel: "1" when it held the session live (it has closed that connection 1008
`resumed_elsewhere` and detached the session into the store: its exact state and replies),
"0" when not. The asker waits for a "1", or for as many "0" as PUBLISH counted receivers, at
most `timeout`; then it takes the session from the store. A killed owner is no longer
subscribed, so it costs no wait; an unresponsive one at most the timeout (and it is fenced at
its next checkpoint). Without this, a takeover across replicas would resume from the last
checkpoint while the old owner went on advancing its copy until that write was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

import redis
import redis.asyncio as aioredis

from server.store import token_hash

log = logging.getLogger("s4serve.handoff")
REQUESTS = "s4serve:release"


class _Asked:
    def __init__(self) -> None:
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.answers = 0
        self.expected: int | None = None

    def answer(self, released: bool) -> None:
        self.answers += 1
        self.check(released)

    def check(self, released: bool = False) -> None:
        if self.done.done():
            return
        if released:
            self.done.set_result(True)
        elif self.expected is not None and self.answers >= self.expected:
            self.done.set_result(False)


class ReplicaHandoff:
    """`release(digest)` lets go of the live session whose token hashes to `digest`."""

    def __init__(self, url: str, release: Callable[[str], bool], timeout: float = 0.5) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=2.0,
                                              socket_connect_timeout=2.0)
        self.release = release
        self.timeout = timeout
        self.channel = f"s4serve:released:{uuid.uuid4().hex}"
        self._asked: dict[str, _Asked] = {}
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        self._pubsub = self.client.pubsub()
        try:
            await self._pubsub.subscribe(REQUESTS, self.channel)
        except redis.RedisError as exc:
            log.error("redis unavailable (%s): no takeover from other replicas", exc)
            return
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        # bounded: a pub/sub read does not always end at once when cancelled, and a process
        # that drained its sessions must exit
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            _, pending = await asyncio.wait([self._task], timeout=1.0)
            if pending:
                log.warning("the replica handoff listener did not stop within 1 s")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pubsub.aclose(), 1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.aclose(), 1.0)

    async def _listen(self) -> None:
        while not self._stopping:
            try:
                async for message in self._pubsub.listen():
                    if message["type"] == "message":
                        await self._on(message["channel"].decode(), message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken message or connection: log, and listen again
                if self._stopping:  # redis-py may turn the cancellation into an error
                    return
                log.exception("replica handoff listener")
                await asyncio.sleep(1.0)

    async def _on(self, channel: str, data: str) -> None:
        parts = data.split()
        if channel == REQUESTS and len(parts) == 3:
            request, digest, reply_to = parts
            if reply_to != self.channel:  # not our own request
                released = self.release(digest)
                await self.client.publish(reply_to, f"{request} {int(released)}")
        elif channel == self.channel and len(parts) == 2:
            asked = self._asked.get(parts[0])
            if asked is not None:
                asked.answer(parts[1] == "1")

    async def take_over(self, token: str) -> bool:
        """Ask every other replica to release `token`; True when one did."""
        if self._task is None:
            return False
        request = uuid.uuid4().hex[:16]
        asked = self._asked[request] = _Asked()
        try:
            receivers = await self.client.publish(
                REQUESTS, f"{request} {token_hash(token)} {self.channel}")
            asked.expected = receivers - 1  # we hear our own request too
            asked.check()
            return await asyncio.wait_for(asked.done, self.timeout)
        except (TimeoutError, redis.RedisError):
            return False
        finally:
            del self._asked[request]
