"""WS /v1/models/{name}/stream: the transport side of one streaming session.

The connection is a `transport.Handler`: each client message arrives as a plain call on the
event loop, is validated and queued with the scheduler, and each reply is written to the socket
the moment a tick produces it; no task, timer or future per message. Flow control: when a
session has `session_queue` items unanswered, or its socket's write buffer is full, reading
pauses (TCP backpressure) until it drains, so a client that floods or never reads cannot grow
server memory; keepalive pings are answered by the transport regardless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket

from server.errors import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    ServeError,
)
from server.models import LoadedModel
from server.protocol import binary_frame, json_samples, parse_start, parse_text
from server.runtime import Runtime
from server.scheduler import Control, Frame
from server.sessions import Session
from server.transport import EXTENSION, AsgiPeer, Peer

log = logging.getLogger("s4serve.ws")
router = APIRouter()


@router.websocket("/v1/models/{name}/stream")
async def stream(websocket: WebSocket, name: str) -> None:
    await websocket.accept()
    push = websocket.scope.get("extensions", {}).get(EXTENSION)
    peer: Peer = push["peer"] if push else AsgiPeer(websocket)
    connection = Connection(websocket.app.state.runtime, peer, websocket)
    if connection.admit(name):
        peer.attach(connection)
    await connection.finished
    await peer.flushed()


class Connection:
    """One client connection and, once started, its session."""

    def __init__(self, runtime: Runtime, peer: Peer, websocket: WebSocket) -> None:
        self.rt = runtime
        self.peer = peer
        self.ws = websocket
        self.settings = runtime.settings
        self.model: LoadedModel | None = None
        self.session: Session | None = None
        self.seq = 0
        self.paused = False
        self.counted = False
        self._handoff: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.finished: asyncio.Future = loop.create_future()
        self.last_seen = loop.time()
        self._idle = loop.call_later(self.settings.idle_timeout, self._check_idle)

    # ----- lifecycle ---------------------------------------------------------------------
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
        rt.connections += 1
        self.counted = True
        return True

    def kick(self, code: int, reason: str) -> None:
        """Close this connection from outside (takeover, shutdown); the session stays
        resumable: its state goes to the store now, queued work is dropped."""
        self._let_go()
        self._close(code, reason)

    def _close(self, code: int, reason: str) -> None:
        self.peer.close(code, reason)
        if not self.counted:  # never admitted: nothing else will end the handler
            self._done()

    def _let_go(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            self.rt.manager.detach(session, self)

    def on_disconnect(self) -> None:
        self._let_go()
        self._done()

    def _done(self) -> None:
        self._idle.cancel()
        if self.counted:
            self.counted = False
            self.rt.connections -= 1
        if not self.finished.done():
            self.finished.set_result(None)

    def _check_idle(self) -> None:
        left = self.last_seen + self.settings.idle_timeout - self.loop.time()
        if left > 0:
            self._idle = self.loop.call_later(left, self._check_idle)
            return
        self.rt.error("idle_timeout")
        self.kick(CLOSE_POLICY, "idle_timeout")

    # ----- incoming ----------------------------------------------------------------------
    def on_message(self, data: bytes | str) -> None:
        self.last_seen = self.loop.time()
        try:
            if len(data) > self.settings.max_frame_bytes:  # uvicorn's ws_max_size stops it first
                self.rt.error("too_large")
                self.kick(CLOSE_TOO_BIG, "frame_too_large")
            elif self.session is None:
                self._before_start(data)
            elif type(data) is bytes:
                self._binary(data)
            else:
                self._text(data)
        except Exception:
            log.exception("stream message handling failed")
            self.kick(CLOSE_INTERNAL, "internal")

    def _before_start(self, data: bytes | str) -> None:
        try:
            if type(data) is bytes:
                raise ServeError("not_started", "send a start message before any data")
            parsed = parse_text(data)
            if parsed["type"] != "start":
                if parsed["type"] in ("samples", "reset", "snapshot", "end"):
                    raise ServeError("not_started", "send a start message before any data")
                raise ServeError("unknown_type", f"unknown message type {parsed['type']!r}")
            opts = parse_start(parsed)
            manager = self.rt.manager
            if opts.resume is not None:
                try:
                    session, samples = manager.resume(self.model, opts.resume, self)
                except ServeError as err:
                    if err.code != "resume_not_found" or self.rt.handoff is None:
                        raise
                    # maybe live on another worker: ask, reading paused meanwhile
                    self.peer.pause_reading()
                    self._handoff = asyncio.ensure_future(self._resume_elsewhere(opts.resume))
                    return
            else:
                if self.rt.scheduler.overloaded(self.model.pool):
                    raise ServeError("overloaded", "the server is past capacity: retry later")
                session = manager.open(self.model, opts, self)
                samples = session.stream.samples
        except ServeError as err:
            self._start_failed(err)
            return
        self._started(session, samples)

    async def _resume_elsewhere(self, token: str) -> None:
        released = await self.rt.handoff.take_over(token)
        if self.finished.done():  # the client left meanwhile
            return
        try:
            if not released:
                raise ServeError("resume_not_found", "unknown or expired resume token")
            session, samples = self.rt.manager.resume(self.model, token, self)
            self.rt.metrics.handoffs.inc()
        except ServeError as err:
            self._start_failed(err)
        else:
            self._started(session, samples)
        finally:
            self.peer.resume_reading()

    def _started(self, session: Session, samples: int) -> None:
        self.session = session
        self.peer.send_text(json.dumps(session.started_message(samples)))

    def _start_failed(self, err: ServeError) -> None:
        self.rt.error(err.code)
        self.peer.send_text(json.dumps(err.ws_message()))
        if err.code == "resume_not_found":
            self._close(CLOSE_POLICY, "resume_not_found")
        elif err.code == "overloaded":
            self._close(CLOSE_TRY_AGAIN, "overloaded")

    def _binary(self, data: bytes) -> None:
        session = self.session
        try:
            samples = binary_frame(data, session.dtype, session.model.info.d_input)
        except ServeError as err:
            self._reject(err)
            return
        self._frame(samples, text=False)

    def _text(self, data: str) -> None:
        try:
            parsed = parse_text(data)
        except ServeError as err:
            self._reply(Control("error", err))
            return
        kind = parsed["type"]
        if kind == "samples":
            try:
                samples = json_samples(parsed, self.session.model.info.d_input)
            except ServeError as err:
                self._reject(err)
                return
            self._frame(samples, text=True)
        elif kind in ("reset", "snapshot", "end"):
            self._reply(Control(kind))
        elif kind == "start":
            self._reply(Control("error", ServeError(
                "already_started", "this connection has started its session")))
        else:
            self._reply(Control("error", ServeError(
                "unknown_type", f"unknown message type {kind!r}")))

    def _frame(self, samples: np.ndarray, text: bool) -> None:
        scheduler = self.rt.scheduler
        if scheduler.overloaded(self.session.stream.pool):
            self._reject(ServeError("overloaded", "the server is past capacity: frame not "
                                    "processed, the state is unchanged"))
            return
        self._queue(Frame(samples, self.seq, time.perf_counter(), text))
        self.seq += 1

    def _reject(self, err: ServeError) -> None:
        """A bad data frame: rejected whole, its error takes the frame's reply slot."""
        self._reply(Control("error", err, self.seq))
        self.seq += 1

    def _reply(self, item: Control) -> None:
        if self.session.stream.queue:  # behind earlier work: keep replies in order
            self._queue(item)
        else:
            self.rt.scheduler.apply(self.session.stream, item)

    def _queue(self, item: Frame | Control) -> None:
        stream = self.session.stream
        self.rt.scheduler.submit(stream, item)
        if not self.paused and len(stream.queue) >= self.settings.session_queue:
            self.paused = True
            self.peer.pause_reading()

    # ----- replies (scheduler sink) ------------------------------------------------------
    def frame_done(self, frame: Frame, outputs: np.ndarray) -> None:
        if frame.text:
            self.peer.send_text(json.dumps({"type": "outputs", "seq": frame.seq, "t": frame.t,
                                            "data": outputs.tolist()}))
        else:
            self.peer.send_bytes(outputs.tobytes())
        self._flow()

    def _flow(self) -> None:
        if self.paused:
            self.on_writable()
        elif not self.peer.can_write:  # the client does not read: stop reading it too
            self.paused = True
            self.peer.pause_reading()

    def frame_failed(self, frame: Frame, exc: Exception) -> None:
        self._send_error(ServeError("internal", "internal error"), frame.seq)
        self.rt.metrics.frames.labels(self.session.name, "error").inc()
        self.kick(CLOSE_INTERNAL, "internal")

    def control_done(self, item: Control, value: Any) -> None:
        session = self.session
        if item.kind == "error":
            self._send_error(item.error, item.seq)
            if item.seq is not None:
                self.rt.metrics.frames.labels(session.name, "error").inc()
        elif item.kind == "reset":
            self.peer.send_text(json.dumps({"type": "reset", "samples": 0}))
        elif item.kind == "snapshot":
            samples, arrays = value
            blob = self.rt.manager.blob(session, samples, arrays)
            self.peer.send_text(json.dumps({"type": "snapshot", "samples": samples,
                                            "state": blob}))
        elif item.kind == "end":
            self.session = None
            samples = self.rt.manager.end(session)
            self.peer.send_text(json.dumps({"type": "end", "samples": samples}))
            self._close(CLOSE_NORMAL, "end")
            return
        self._flow()

    def _send_error(self, err: ServeError, seq: int | None) -> None:
        self.rt.error(err.code)
        message = err.ws_message()
        if seq is not None:
            message["seq"] = seq
        self.peer.send_text(json.dumps(message))

    def on_writable(self) -> None:
        """Resume reading once the session's queue is half drained and the socket writable."""
        if (self.paused and self.peer.can_write and (self.session is None or
                len(self.session.stream.queue) <= self.settings.session_queue // 2)):
            self.paused = False
            self.peer.resume_reading()

