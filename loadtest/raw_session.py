"""The lean load engine: every session of a process on one minimal WebSocket client protocol
and one send schedule, so that the load generator costs less than the server it measures.

The client library's AsyncStream (loadtest/session.py) runs a task, a sleep and websockets'
framing per frame: ~50 us of CPU per per-sample frame on 2 shared cores, as much as the server
under test, so at 300+ sessions the generator itself held the box. Here a frame is one
`transport.write` of a pre-encoded payload under a fresh mask, a reply one parse of a few
header bytes, and one timer serves every session of the process. Binary frames only (float32
and int16 wires, plain ws://); the judgement is the same SessionRecord as the other engine.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import json
import os
import random
import struct
import time
from array import array
from collections import deque
from urllib.parse import urlsplit

import numpy as np
from websockets.speedups import apply_mask

from client.wire import start_message, ws_header, ws_length
from loadtest.session import HANDSHAKE_TIMEOUT_S, SessionPlan, SessionRecord

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame, masked with a fresh key (RFC 6455 5.3)."""
    key = random.randbytes(4)
    return ws_header(opcode, len(payload), mask=True) + key + apply_mask(payload, key)


class RawSocket(asyncio.Protocol):
    """RFC 6455 client: handshake, masked frames out, unmasked frames in (no extensions)."""

    def __init__(self, host: str, path: str, headers: dict[str, str], session: RawSession):
        self.host, self.path, self.headers, self.session = host, path, headers, session
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.key = base64.b64encode(os.urandom(16))
        self.buf = b""
        self.upgraded = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        lines = [f"GET {self.path} HTTP/1.1", f"Host: {self.host}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {self.key.decode()}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            if b"\r\n\r\n" not in buf:
                self.buf = buf
                return
            head, buf = buf.split(b"\r\n\r\n", 1)
            accept = base64.b64encode(hashlib.sha1(self.key + _ACCEPT_GUID).digest())
            if not head.startswith(b"HTTP/1.1 101") or accept not in head:
                self.opened.set_exception(ConnectionError(head.split(b"\r\n", 1)[0].decode()))
                self.transport.close()
                return
            self.upgraded = True
            self.opened.set_result(None)
        at = 0
        while (span := ws_length(buf, at)) is not None and span[1] + span[0] <= len(buf):
            size, head = span  # server frames are not masked
            self.session.on_frame(buf[at] & 0x0F, buf[head:head + size])
            at = head + size
        self.buf = buf[at:]

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        self.session.on_lost()

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_client_frame(opcode, payload))


class RawSession:
    """One session's bookkeeping: what was sent, what came back, as a SessionRecord."""

    def __init__(self, plan: SessionPlan, d_output: int):
        self.plan, self.d_output = plan, d_output
        self.rec = SessionRecord(plan.index)
        self.reply_bytes = 4 * d_output * plan.frame
        self.sock: RawSocket | None = None
        self.pending: deque[tuple[float, int]] = deque()
        self.sent_at, self.latency = array("d"), array("d")
        self.outputs: list[np.ndarray] = []
        self.inputs: list[np.ndarray] = []
        self.kept_rows = self.answered_samples = self.k = 0
        self.stream_start = 0.0
        self.k_done = False  # every frame of the plan was sent
        self.control: asyncio.Future | None = None  # the started / end reply awaited
        self.closed = False
        self.settled = asyncio.Event()

    def on_frame(self, opcode: int, payload: bytes) -> None:
        now = time.monotonic()
        if opcode == 2:
            if not self.pending:
                self.rec.duplicated += 1
                return
            sent, k = self.pending.popleft()
            if len(payload) != self.reply_bytes:
                self.rec.wrong += 1
            else:
                self.rec.replies_ok += 1
                self.sent_at.append(sent)
                self.latency.append(now - sent)
                plan = self.plan
                if plan.verify and self.kept_rows < plan.verify_max_samples:
                    self.outputs.append(np.frombuffer(payload, "<f4").reshape(-1, self.d_output))
                    self.inputs.append(plan.block(k))
                    self.kept_rows += plan.frame
            self.answered_samples += self.plan.frame
        elif opcode == 1:
            reply = json.loads(payload)
            if reply.get("type") == "error" and self.pending:
                self.pending.popleft()  # a rejected frame: the server's state did not move
                self.rec.errors[reply.get("code", "error")] += 1
            elif self.control is not None and not self.control.done():
                self.control.set_result(reply)
            else:
                self.rec.duplicated += 1
        elif opcode == 9:  # the server's keepalive ping
            self.sock.send(10, payload)
            return
        elif opcode == 8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            if code != 1000 and not self.closed:
                self.rec.errors[f"close_{code}"] += 1
            self.sock.send(8, payload[:2])  # the closing handshake's answer
            self._closed()
            return
        if not self.pending and self.k_done:
            self.settled.set()

    def on_lost(self) -> None:
        if not self.closed:
            self.rec.errors["close_1006"] += 1
        self._closed()

    def _closed(self) -> None:
        self.closed = True
        self.settled.set()
        if self.control is not None and not self.control.done():
            self.control.set_exception(ConnectionError("closed"))

    async def ask(self, message: str, timeout: float) -> dict:
        self.control = asyncio.get_running_loop().create_future()
        self.sock.send(1, message.encode())
        return await asyncio.wait_for(self.control, timeout)

    def finish(self) -> SessionRecord:
        rec = self.rec
        rec.lost = len(self.pending)
        rec.sent_at = np.frombuffer(self.sent_at, dtype=np.float64)
        rec.latency = np.frombuffer(self.latency, dtype=np.float64)
        if self.outputs and not rec.wrong:
            rec.verify_outputs = np.concatenate(self.outputs)[: self.plan.verify_max_samples]
            rec.verify_inputs = np.concatenate(self.inputs)[: self.plan.verify_max_samples]
        return rec


async def _open(session: RawSession, url: str, model: str, token: str | None) -> bool:
    plan = session.plan
    await asyncio.sleep(max(0.0, plan.start_at - time.monotonic()))
    parts = urlsplit(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    loop = asyncio.get_running_loop()
    try:
        _, sock = await asyncio.wait_for(loop.create_connection(
            lambda: RawSocket(parts.netloc, f"/v1/models/{model}/stream", headers, session),
            parts.hostname, parts.port or 80), HANDSHAKE_TIMEOUT_S)
        session.sock = sock
        await asyncio.wait_for(sock.opened, HANDSHAKE_TIMEOUT_S)
        options = plan.options()
        reply = await session.ask(start_message(options.dtype, "every", options.sample_rate),
                                  HANDSHAKE_TIMEOUT_S)
    except (OSError, TimeoutError, ConnectionError) as exc:
        session.rec.errors[f"connect_{type(exc).__name__}"] += 1
        return False
    if reply.get("type") != "started":
        session.rec.errors[reply.get("code", "not_started")] += 1
        return False
    session.rec.connected = True
    return True


async def run_raw_plans(plans: list[SessionPlan], url: str, model: str, token: str | None,
                        d_output: int, drain_s: float) -> list[SessionRecord]:
    """Every plan of this process: open on schedule, send on one shared timer, drain, end."""
    sessions = [RawSession(plan, d_output) for plan in plans]
    due: list[tuple[float, int]] = []
    opened = await asyncio.gather(*(_open(s, url, model, token) for s in sessions))
    for i, (session, ok) in enumerate(zip(sessions, opened, strict=True)):
        if ok:
            session.stream_start = max(session.plan.start_at, time.monotonic())
            heapq.heappush(due, (session.stream_start, i))
        else:
            session.k_done = True
            session.settled.set()
    while due:
        now = time.monotonic()
        while due and due[0][0] <= now:
            at, i = heapq.heappop(due)
            session = sessions[i]
            plan, rec = session.plan, session.rec
            if session.closed or at >= plan.stop_at:
                session.k_done = True
                if not session.pending:
                    session.settled.set()
                continue
            if len(session.pending) >= plan.max_in_flight:
                rec.stalls += 1
                heapq.heappush(due, (now + plan.period_s / 4, i))
                continue
            rec.max_send_lag_s = max(rec.max_send_lag_s, now - at)
            session.pending.append((now, session.k))
            session.sock.send(2, plan.payload(session.k))
            session.k += 1
            rec.frames_sent = session.k
            heapq.heappush(due, (session.stream_start + session.k * plan.period_s, i))
        if due:
            await asyncio.sleep(max(0.0, due[0][0] - time.monotonic()))
    await asyncio.gather(*(_close(s, drain_s) for s in sessions if s.rec.connected))
    return [s.finish() for s in sessions]


async def _close(session: RawSession, drain_s: float) -> None:
    try:
        await asyncio.wait_for(session.settled.wait(), drain_s)
    except TimeoutError:
        session.rec.errors["drain_timeout"] += 1
    if not session.closed and not session.pending:
        try:
            reply = await session.ask(json.dumps({"type": "end"}), drain_s)
            session.rec.end_mismatch = reply.get("samples") != session.answered_samples
        except (TimeoutError, ConnectionError):
            session.rec.errors["no_end"] += 1
    session.closed = True  # what the connection does from here on is not the server's
    if session.sock is not None and session.sock.transport is not None:
        session.sock.transport.close()
