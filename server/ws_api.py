"""WS /v1/models/{name}/stream: the transport side of one streaming session.

The connection is a `transport.Handler`: each client message arrives as a plain call on the
event loop, is validated and queued with the scheduler, and the replies a round of a tick
produces are written to the socket at its end, one write (server/cork.py); no task, timer or
future per message. Flow control: when a session has `session_queue` items unanswered, or its
socket's write buffer is full, reading pauses (TCP backpressure) until it drains, so a client
that floods or never reads cannot grow server memory; keepalive pings are answered by the
transport regardless.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket

from server.errors import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    ServeError,
)
from server.link import Link, peer_for
from server.protocol import binary_frame, json_samples, parse_start, parse_text
from server.runtime import Runtime
from server.scheduler import Control, Frame
from server.sessions import Session
from server.transport import Peer

OVERLOADED_MESSAGE = "the server is past capacity: frame not processed, the state is unchanged"
# a frame's seq is %-formatted in (see _frame)
OVERLOADED_REPLY = (
    '{"type": "error", "code": "overloaded", "message": "' + OVERLOADED_MESSAGE + '", "seq": %d}'
)

router = APIRouter()


@router.websocket("/v1/models/{name}/stream")
async def stream(websocket: WebSocket, name: str) -> None:
    await websocket.accept()
    await Connection(websocket.app.state.runtime, peer_for(websocket), websocket).serve(name)


class Connection(Link):
    """One client connection and, once started, its session."""

    def __init__(self, runtime: Runtime, peer: Peer, websocket: WebSocket) -> None:
        super().__init__(runtime, peer, websocket)
        self.session: Session | None = None
        self.seq = 0
        self._refused = 0  # frames answered `overloaded` since reading last resumed
        self._handoff: asyncio.Future | None = None

    def _let_go(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            self.rt.manager.detach(session, self)

    # ----- incoming ----------------------------------------------------------------------
    def _handle(self, data: bytes | str) -> None:
        if self.session is None:
            self._before_start(data)
        elif type(data) is bytes:
            self._binary(data)
        else:
            self._text(data)

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
                elsewhere = manager.maybe_elsewhere(opts.resume,
                                                    self.rt.handoff or self.rt.replicas)
                resumed = None if elsewhere else self.resume_now(opts.resume, self)
                if resumed is None:
                    # live on another worker (ask it), or not stored yet (wait for it),
                    # reading paused meanwhile
                    self.peer.pause_reading()
                    self._handoff = asyncio.ensure_future(
                        self._resume_later(opts.resume, elsewhere, opts.received))
                    return
                self._started(*resumed, opts.received, resumed=True)
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

    async def _resume_later(self, token: str, elsewhere: bool, received: int | None) -> None:
        try:
            resumed = await self.resume_later(token, self, elsewhere)
        except ServeError as err:
            self._start_failed(err)
        else:
            if resumed is not None:
                self._started(*resumed, received, resumed=True)
        finally:
            self.peer.resume_reading()

    def _started(self, session: Session, samples: int, received: int | None = None,
                 resumed: bool = False) -> None:
        """`started`; on a resume with `received`, then the replies the client missed. A
        resume always says `replies`, so a new owner can count as the server does."""
        self.session = session
        self._frames_error = self.rt.metrics.frames.labels(session.name, "error")
        message = session.started_message(samples)
        missed: list[bytes | str] = []
        if received is not None:
            missed = session.ring.since(received) or []
        if resumed:
            message.update(replies=session.ring.count, resent=len(missed))
        self.peer.send_text(json.dumps(message))
        for payload in missed:  # as first sent: counted once
            if type(payload) is bytes:
                self.peer.send_bytes(payload)
            else:
                self.peer.send_text(payload)

    def _start_failed(self, err: ServeError) -> None:
        self.rt.error(err.code)
        self.peer.send_text(json.dumps(err.ws_message()))
        self._flow()  # a client that never reads its errors stops being read
        if err.code in ("resume_not_found", "not_streamable"):
            self._close(CLOSE_POLICY, err.code)
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
            if self.session.stream.queue:
                self._reject(ServeError("overloaded", OVERLOADED_MESSAGE))
                return
            # the common case past capacity: answered at once, and cheaply (no JSON encoding)
            self.rt.error("overloaded")
            self._frames_error.inc()
            self._text_reply(OVERLOADED_REPLY % self.seq)
            self.seq += 1
            self._refused += 1
            if self._refused == self.settings.pressed_queue:  # the rest wait in the socket
                self._pause()
                scheduler.after_tick(self._after_refusals)
            else:
                self._flow()  # answered at once, but not faster than the client reads
            return
        self._queue(Frame(samples, self.seq, time.perf_counter(), text))
        self.seq += 1

    def _after_refusals(self) -> None:
        self._refused = 0
        if not self.finished.done():
            self.on_writable()

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
        if len(stream.queue) >= self._limit() or stream.queued_bytes >= self._byte_limit:
            self._pause()

    def _limit(self) -> int:
        """Frames in flight before the socket stops being read: session_queue, or
        pressed_queue while the server is under pressure."""
        settings = self.settings
        return settings.pressed_queue if self.rt.scheduler.pressed else settings.session_queue

    @property
    def _byte_limit(self) -> int:
        """Bytes of queued samples before the socket stops being read (session_queue_kb)."""
        return self.settings.session_queue_kb << 10

    # ----- replies (scheduler sink) ------------------------------------------------------
    # every reply after `started` is counted and kept in the session's ring (server/replies.py)
    def _text_reply(self, payload: str) -> None:
        self.session.ring.add(payload)
        self.peer.send_text(payload)

    def frame_done(self, frame: Frame, outputs: np.ndarray) -> None:
        self._outputs(frame, outputs)
        self._flow()

    def frames_done(self, frames: list[Frame], outputs: np.ndarray) -> None:
        for frame, out in zip(frames, outputs, strict=True):
            self._outputs(frame, out[None])
        self._flow()  # once: reading may resume only after all of them

    def _outputs(self, frame: Frame, outputs: np.ndarray) -> None:
        """A frame's reply: its outputs (T, d_output), as JSON for a text frame."""
        if frame.text:
            self._text_reply(json.dumps({"type": "outputs", "seq": frame.seq, "t": frame.t,
                                         "data": outputs.tolist()}))
        else:
            payload = outputs.tobytes()
            self.session.ring.add(payload)
            self.peer.send_bytes(payload)

    def _flow(self) -> None:
        if self.paused:
            self.on_writable()
        elif not self.peer.can_write:  # the client does not read: stop reading it too
            self._pause()

    def frame_failed(self, frame: Frame, exc: Exception) -> None:
        self._send_error(ServeError("internal", "internal error"), frame.seq)
        self._frames_error.inc()
        self.kick(CLOSE_INTERNAL, "internal")

    def work_dropped(self, items: list[Frame | Control]) -> None:
        """Nothing to answer: work is dropped only when this connection is gone."""

    def control_done(self, item: Control, value: Any) -> None:
        session = self.session
        if item.kind == "error":
            self._send_error(item.error, item.seq)
            if item.seq is not None:
                self._frames_error.inc()
        elif item.kind == "reset":
            self._text_reply(json.dumps({"type": "reset", "samples": 0}))
        elif item.kind == "snapshot":
            samples, arrays = value
            blob = self.rt.manager.blob(session, samples, arrays)
            self._text_reply(json.dumps({"type": "snapshot", "samples": samples,
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
        self._text_reply(json.dumps(message))

    def on_writable(self) -> None:
        """Resume reading once the session's queue is half drained and the socket writable."""
        stream = self.session.stream if self.session is not None else None
        self._resume_if(stream is None or (
            len(stream.queue) <= self._limit() // 2
            and stream.queued_bytes <= self._byte_limit // 2))
