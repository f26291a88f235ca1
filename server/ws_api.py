"""WS /v1/models/{name}/stream: the transport of one streaming session.

A reader task takes client messages, validates them and queues their work with the scheduler;
a writer task sends the replies in the order the messages came. The reader waits for a free
credit (one per reply in flight, `session_queue` in all) before it reads another message, so a
client that floods is slowed down by TCP backpressure instead of growing server memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

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
from server.sessions import Session

log = logging.getLogger("s4serve.ws")
router = APIRouter()


@router.websocket("/v1/models/{name}/stream")
async def stream(websocket: WebSocket, name: str) -> None:
    await Connection(websocket.app.state.runtime, websocket).serve(name)


@dataclass
class Reply:
    kind: str  # "binary" | "json" | "reset" | "snapshot" | "end" | "error"
    future: asyncio.Future | None
    received: float
    seq: int | None = None
    error: ServeError | None = None


class _Closing(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


class Connection:
    def __init__(self, runtime: Runtime, websocket: WebSocket) -> None:
        self.rt = runtime
        self.ws = websocket
        self.settings = runtime.settings
        self.close_with: tuple[int, str] | None = None
        self.ended = False
        self.alive = True
        self._reader: asyncio.Task | None = None

    # ----- lifecycle ----------------------------------------------------------------
    async def serve(self, name: str) -> None:
        await self.ws.accept()
        try:
            model = self._admit(name)
        except _Closing as closing:
            await self._close(closing.code, closing.reason)
            return
        self.rt.connections += 1
        try:
            session = await self._handshake(model)
            if session is not None:
                await self._run(session)
        except _Closing as closing:
            if self.alive:
                self.close_with = self.close_with or (closing.code, closing.reason)
        finally:
            self.rt.connections -= 1
        if self.close_with is not None:
            await self._close(*self.close_with)

    def _admit(self, name: str) -> LoadedModel:
        headers, guard = self.ws.headers, self.rt.guard
        if not guard.origin_ok(headers):
            self.rt.error("origin_not_allowed")
            raise _Closing(CLOSE_POLICY, "origin_not_allowed")
        if not guard.key_ok(headers, self.ws.query_params):
            self.rt.error("unauthorized")
            raise _Closing(CLOSE_POLICY, "unauthorized")
        if self.rt.draining or not self.rt.ready:
            self.rt.error("overloaded")
            raise _Closing(CLOSE_TRY_AGAIN, "draining" if self.rt.draining else "not_ready")
        if name not in self.rt.models:
            self.rt.error("model_not_found")
            raise _Closing(CLOSE_POLICY, "model_not_found")
        if self.rt.connections >= self.settings.max_sessions:
            self.rt.error("overloaded")
            raise _Closing(CLOSE_TRY_AGAIN, "overloaded")
        return self.rt.models[name]

    def kick(self, code: int, reason: str) -> None:
        """Close this connection from outside (takeover, shutdown); its session stays intact."""
        self.close_with = (code, reason)
        if self._reader is not None:
            self._reader.cancel()

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=reason)

    async def _receive(self) -> dict[str, Any]:
        try:
            message = await asyncio.wait_for(self.ws.receive(), self.settings.idle_timeout)
        except TimeoutError:
            self.rt.error("idle_timeout")
            raise _Closing(CLOSE_POLICY, "idle_timeout") from None
        if message["type"] == "websocket.disconnect":
            self.alive = False
            raise _Closing(CLOSE_NORMAL, "disconnected")
        size = len(message.get("bytes") or message.get("text") or "")
        if size > self.settings.max_frame_bytes:  # uvicorn's ws_max_size normally stops it first
            self.rt.error("too_large")
            raise _Closing(CLOSE_TOO_BIG, "frame_too_large")
        return message

    async def _send(self, payload: dict[str, Any] | bytes) -> None:
        if not self.alive:
            return
        try:
            if isinstance(payload, bytes):
                await self.ws.send_bytes(payload)
            else:
                await self.ws.send_text(json.dumps(payload))
        except Exception:  # the peer is gone; the work it asked for still counts
            self.alive = False

    # ----- before start -------------------------------------------------------------
    async def _handshake(self, model: LoadedModel) -> Session | None:
        while True:
            message = await self._receive()
            try:
                return await self._start(model, message)
            except ServeError as err:
                self.rt.error(err.code)
                await self._send(err.ws_message())
                if err.code == "resume_not_found":
                    raise _Closing(CLOSE_POLICY, "resume_not_found") from None
                if err.code == "overloaded":
                    raise _Closing(CLOSE_TRY_AGAIN, "overloaded") from None

    async def _start(self, model: LoadedModel, message: dict[str, Any]) -> Session:
        if message.get("text") is None:
            raise ServeError("not_started", "send a start message before any data")
        parsed = parse_text(message["text"])
        if parsed["type"] != "start":
            known = parsed["type"] in ("samples", "reset", "snapshot", "end")
            if known:
                raise ServeError("not_started", "send a start message before any data")
            raise ServeError("unknown_type", f"unknown message type {parsed['type']!r}")
        opts = parse_start(parsed)
        manager = self.rt.manager
        if opts.resume is not None:
            session, samples = await manager.resume(model, opts.resume, self)
        else:
            session = await manager.open(model, opts, self)
            samples = session.stream.samples
        await self._send(session.started_message(samples))
        return session

    # ----- after start --------------------------------------------------------------
    async def _run(self, session: Session) -> None:
        replies: asyncio.Queue[Reply | None] = asyncio.Queue()
        credits = asyncio.Semaphore(self.settings.session_queue)
        writer = asyncio.create_task(self._write(session, replies, credits))
        self._reader = asyncio.create_task(self._read(session, replies, credits))
        await asyncio.wait([self._reader])
        if not self._reader.cancelled() and self._reader.exception() is not None:
            closing = self._reader.exception()
            if not isinstance(closing, _Closing):
                log.error("session %s reader failed", session.id, exc_info=closing)
                closing = _Closing(CLOSE_INTERNAL, "internal")
            if closing.code != CLOSE_NORMAL or self.alive:
                self.close_with = self.close_with or (closing.code, closing.reason)
        await replies.put(None)
        await writer
        if self.ended:
            self.close_with = (CLOSE_NORMAL, "end")
        else:
            await self.rt.manager.detach(session, self)

    async def _read(self, session: Session, replies: asyncio.Queue, credits) -> None:
        seq = 0
        while True:
            await credits.acquire()
            message = await self._receive()
            received = time.perf_counter()
            reply = self._dispatch(session, message, received, seq)
            if reply.seq is not None:  # data frames, accepted or not, are numbered
                seq += 1
            replies.put_nowait(reply)
            if reply.kind == "end":
                self.ended = True
                return

    def _dispatch(self, session: Session, message: dict, received: float, seq: int) -> Reply:
        manager, scheduler, d_input = self.rt.manager, self.rt.scheduler, session.model.info.d_input
        try:
            if message.get("bytes") is not None:
                try:
                    frame = binary_frame(message["bytes"], session.dtype, d_input)
                except ServeError as err:
                    return Reply("error", None, received, seq, err)
                return Reply("binary", scheduler.submit(session.stream, "frame", frame),
                             received, seq)
            parsed = parse_text(message["text"])
            kind = parsed["type"]
            if kind == "samples":
                try:
                    frame = json_samples(parsed, d_input)
                except ServeError as err:
                    return Reply("error", None, received, seq, err)
                return Reply("json", scheduler.submit(session.stream, "frame", frame),
                             received, seq)
            if kind == "reset":
                return Reply("reset", manager.submit_reset(session), received)
            if kind == "snapshot":
                return Reply("snapshot", manager.submit_snapshot(session), received)
            if kind == "end":
                return Reply("end", manager.submit_end(session), received)
            if kind == "start":
                raise ServeError("already_started", "this connection has started its session")
            raise ServeError("unknown_type", f"unknown message type {kind!r}")
        except ServeError as err:
            return Reply("error", None, received, None, err)

    async def _write(self, session: Session, replies: asyncio.Queue, credits) -> None:
        metrics, name = self.rt.metrics, session.name
        # label lookups take a lock and a dict probe: resolve them once per connection
        frames_ok = metrics.frames.labels(name, "ok")
        frames_error = metrics.frames.labels(name, "error")
        latency = metrics.frame_latency.labels(name)
        while (reply := await replies.get()) is not None:
            try:
                value = await reply.future if reply.future is not None else None
            except Exception as exc:  # compute failed; the state was not changed
                log.error("session %s: compute failed", session.id, exc_info=exc)
                reply = Reply("error", None, reply.received, reply.seq,
                              ServeError("internal", "internal error"))
                self.kick(CLOSE_INTERNAL, "internal")
            await self._send(self._render(session, reply, value))
            if reply.kind == "error":
                self.rt.error(reply.error.code)
                frames_error.inc()
            elif reply.kind in ("binary", "json"):
                frames_ok.inc()
                latency.observe(time.perf_counter() - reply.received)
            credits.release()

    def _render(self, session: Session, reply: Reply, value: Any) -> dict[str, Any] | bytes:
        if reply.kind == "binary":
            return value.outputs.astype("<f4").tobytes()
        if reply.kind == "json":
            return {"type": "outputs", "seq": reply.seq, "t": value.t,
                    "data": value.outputs.tolist()}
        if reply.kind == "reset":
            return {"type": "reset", "samples": value}
        if reply.kind == "snapshot":
            samples, arrays = value
            return {"type": "snapshot", "samples": samples,
                    "state": self.rt.manager.blob(session, samples, arrays)}
        if reply.kind == "end":
            return {"type": "end", "samples": value[0]}
        message = reply.error.ws_message()
        if reply.seq is not None:
            message["seq"] = reply.seq
        return message
