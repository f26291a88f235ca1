"""What every WebSocket endpoint connection shares: admission (auth, origin, readiness,
limits), resuming a session that is not here yet, the idle watchdog, closing, and the end of
the ASGI handler."""

from __future__ import annotations

import asyncio
import logging

from fastapi import WebSocket

from server.asgi_peer import AsgiPeer
from server.errors import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    ServeError,
)
from server.models import LoadedModel
from server.runtime import Runtime
from server.sessions import Owner, Session
from server.transport import EXTENSION, Peer

log = logging.getLogger("s4serve.ws")
RESUME_POLL_S = 0.05  # how often a waiting resume looks in the store again


def peer_for(websocket: WebSocket) -> Peer:
    """The push transport when the server provides it, else the plain ASGI one."""
    push = websocket.scope.get("extensions", {}).get(EXTENSION)
    return push["peer"] if push else AsgiPeer(websocket)


class Link:
    """One accepted WebSocket; subclasses handle its messages (`transport.Handler`)."""

    def __init__(self, runtime: Runtime, peer: Peer, websocket: WebSocket) -> None:
        self.rt = runtime
        self.peer = peer
        self.ws = websocket
        self.settings = runtime.settings
        self.model: LoadedModel | None = None
        self.counted = False
        self.paused = False
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.finished: asyncio.Future = loop.create_future()
        self.last_seen = loop.time()
        self._idle = loop.call_later(self.settings.idle_timeout, self._check_idle)

    async def serve(self, name: str) -> None:
        """Admit, attach, and return when the connection is over."""
        if self.admit(name):
            self.peer.attach(self)
        await self.finished
        await self.peer.flushed()

    def resume_now(self, token: str, owner: Owner) -> tuple[Session, int] | None:
        """The session, if here or in the store; None when it is worth waiting for."""
        try:
            return self.rt.manager.resume(self.model, token, owner)
        except ServeError as err:
            if err.code == "resume_not_found" and not err.final and self.settings.resume_wait:
                return None
            raise

    async def resume_later(self, token: str, owner: Owner,
                           elsewhere: bool) -> tuple[Session, int] | None:
        """Ask the other workers first when `elsewhere` (a live owner's state is ahead of its
        checkpoint), then take the session from the store, waiting up to `resume_wait` for a
        record that is not there yet (a detach racing this resume). None: the client left
        meanwhile. Raises the resume's ServeError."""
        released = False
        if elsewhere and self.rt.handoff is not None:
            released = await self.rt.handoff.take_over(token)
        if elsewhere and not released and self.rt.replicas is not None:
            released = await self.rt.replicas.take_over(token)
        deadline = self.loop.time() + self.settings.resume_wait
        while not self.finished.done():
            try:  # released: its final state is in the store; else maybe a checkpoint is
                session, samples = self.rt.manager.resume(self.model, token, owner)
            except ServeError as err:
                if (err.code != "resume_not_found" or err.final
                        or self.loop.time() >= deadline):
                    raise
                await asyncio.sleep(RESUME_POLL_S)
                if elsewhere and not released and self.rt.handoff is not None:
                    # a worker may have resumed it since it was asked: ask again, so that
                    # it hands the session over instead of both owning it
                    released = await self.rt.handoff.take_over(token)
                continue
            except Exception as exc:  # the store failed (a full disk, say): the waiting
                # client is answered rather than left without a reply
                log.exception("resume failed")
                raise ServeError("internal", "the resume failed: try again") from exc
            if released:
                self.rt.metrics.handoffs.inc()
            return session, samples
        return None

    def admit(self, name: str) -> bool:
        headers, guard, rt = self.ws.headers, self.rt.guard, self.rt
        reason = None
        if not guard.origin_ok(headers):
            code, reason, error = CLOSE_POLICY, "origin_not_allowed", "origin_not_allowed"
        elif not guard.key_ok(headers, self.ws.query_params):
            code, reason, error = CLOSE_POLICY, "unauthorized", "unauthorized"
        elif rt.draining or not rt.ready:
            code, error = CLOSE_TRY_AGAIN, "overloaded"
            reason = "draining" if rt.draining else "not_ready"
        elif name not in rt.models:
            code, reason, error = CLOSE_POLICY, "model_not_found", "model_not_found"
        elif rt.connections >= self.settings.max_sessions:
            code, reason, error = CLOSE_TRY_AGAIN, "overloaded", "overloaded"
        if reason is not None:
            rt.error(error)
            self._close(code, reason)
            return False
        self.model = rt.models[name]
        rt.links.add(self)
        self.counted = True
        return True

    def on_message(self, data: bytes | str) -> None:
        """A client message: size limit and fault isolation here, the rest in `_handle`."""
        self.last_seen = self.loop.time()
        try:
            if len(data) > self.settings.max_frame_bytes:  # uvicorn's ws_max_size stops it first
                self.rt.error("too_large")
                self.kick(CLOSE_TOO_BIG, "frame_too_large")
            else:
                self._handle(data)
        except Exception:
            log.exception("%s message handling failed", type(self).__name__)
            self.kick(CLOSE_INTERNAL, "internal")

    def _handle(self, data: bytes | str) -> None:
        raise NotImplementedError

    def kick(self, code: int, reason: str) -> None:
        """Close from outside (takeover, shutdown); sessions stay resumable."""
        self._let_go()
        self._close(code, reason)

    def _let_go(self) -> None:
        """Detach this connection's sessions into the store (their queued work is dropped)."""

    def _close(self, code: int, reason: str) -> None:
        self.peer.close(code, reason)
        if not self.counted:  # never admitted: nothing else will end the handler
            self._done()

    def on_disconnect(self) -> None:
        self._let_go()
        self._done()

    def _done(self) -> None:
        self._idle.cancel()
        if self.counted:
            self.counted = False
            self.rt.links.discard(self)
        if not self.finished.done():
            self.finished.set_result(None)

    def _check_idle(self) -> None:
        left = self.last_seen + self.settings.idle_timeout - self.loop.time()
        if left > 0:
            self._idle = self.loop.call_later(left, self._check_idle)
            return
        self.rt.error("idle_timeout")
        self.kick(CLOSE_POLICY, "idle_timeout")

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.peer.pause_reading()

    def _resume_if(self, drained: bool) -> None:
        if self.paused and drained and self.peer.can_write:
            self.paused = False
            self.peer.resume_reading()

    def on_writable(self) -> None: ...
