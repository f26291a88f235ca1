"""One streaming session: send frames on a fixed schedule, check every reply as it comes back."""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from loadtest.protocol import (
    Reply,
    decode_binary_reply,
    decode_text_reply,
    encode_binary,
    encode_json_frame,
    start_message,
)

HANDSHAKE_TIMEOUT_S = 30.0


@dataclass
class SessionPlan:
    """What one session sends and when (times are time.monotonic() seconds)."""

    index: int
    start_at: float
    stop_at: float
    period_s: float
    frame: int
    wire: str
    seen: np.ndarray  # (loop_len, d_input) float32 values as the server decodes them
    verify: bool
    verify_max_samples: int
    max_in_flight: int
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        self.loop_frames = len(self.seen) // self.frame
        self._encoded = encode_binary(self.seen, self.wire) if self.wire != "json" else b""
        self._frame_bytes = len(self._encoded) // max(self.loop_frames, 1)

    def block(self, k: int) -> np.ndarray:
        """Frame k's (T, d_input) values; the signal repeats after loop_frames frames."""
        j = k % self.loop_frames
        return self.seen[j * self.frame : (j + 1) * self.frame]

    def payload(self, k: int) -> bytes | str:
        """Frame k's message."""
        j = k % self.loop_frames
        if self.wire == "json":
            return encode_json_frame(self.block(k))
        return self._encoded[j * self._frame_bytes : (j + 1) * self._frame_bytes]


@dataclass
class SessionRecord:
    """Everything one session observed; plain data so worker processes can return it."""

    index: int
    connected: bool = False
    frames_sent: int = 0
    replies_ok: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    wrong: int = 0
    end_mismatch: bool = False
    errors: Counter = field(default_factory=Counter)
    max_send_lag_s: float = 0.0
    stalls: int = 0
    sent_at: np.ndarray | None = None  # send times (s, monotonic) of answered frames
    latency: np.ndarray | None = None  # send -> reply seconds, same order
    verify_inputs: np.ndarray | None = None
    verify_outputs: np.ndarray | None = None


class _Stream:
    """State shared by a session's sender and receiver."""

    def __init__(self, plan: SessionPlan, ws: ClientConnection, d_output: int):
        self.plan = plan
        self.ws = ws
        self.d_output = d_output
        self.rec = SessionRecord(plan.index, connected=True)
        self.pending: deque[tuple[float, int]] = deque()
        self.room = asyncio.Event()
        self.sent_at = array("d")
        self.latency = array("d")
        self.outputs: list[np.ndarray] = []
        self.inputs: list[np.ndarray] = []
        self.missing: set[int] = set()
        self.kept_rows = 0
        self.answered_samples = 0

    async def send_loop(self, stream_start: float) -> None:
        plan, rec = self.plan, self.rec
        k = 0
        due = stream_start
        try:
            while due < plan.stop_at:
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    rec.max_send_lag_s = max(rec.max_send_lag_s, now - due)
                while len(self.pending) >= plan.max_in_flight:
                    rec.stalls += 1
                    self.room.clear()
                    await self.room.wait()
                self.pending.append((time.monotonic(), k))
                await self.ws.send(plan.payload(k))
                rec.frames_sent = k = k + 1
                due = stream_start + k * plan.period_s
            await self.ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            return

    def on_reply(self, reply: Reply, now: float) -> None:
        rec, plan = self.rec, self.plan
        if not self.pending:
            rec.duplicated += 1
            return
        if reply.seq is not None and not self._align(reply.seq):
            return
        sent, k = self.pending.popleft()
        self.room.set()
        if reply.kind == "error":  # a rejected frame: the server's state did not move
            rec.errors[reply.code or "unknown"] += 1
            return
        if (
            reply.malformed
            or reply.rows != plan.frame
            or (reply.t is not None and reply.t != self.answered_samples)
        ):
            rec.wrong += 1
            self.answered_samples += plan.frame
            return
        rec.replies_ok += 1
        self.answered_samples += plan.frame
        self.sent_at.append(sent)
        self.latency.append(now - sent)
        if plan.verify and self.kept_rows < plan.verify_max_samples:
            self.outputs.append(np.array(reply.values, dtype=np.float32))
            self.inputs.append(plan.block(k))
            self.kept_rows += reply.rows

    def _align(self, seq: int) -> bool:
        """JSON replies name their frame: skip frames never answered, spot late and repeats."""
        rec = self.rec
        if seq < self.pending[0][1]:
            if seq in self.missing:
                self.missing.discard(seq)
                rec.reordered += 1
            else:
                rec.duplicated += 1
            return False
        while self.pending and self.pending[0][1] < seq:
            self.missing.add(self.pending.popleft()[1])
            self.answered_samples += self.plan.frame  # the later reply's t says it was consumed
        if not self.pending:
            rec.wrong += 1
            return False
        return True

    async def receive_loop(self) -> None:
        keep = self.plan.verify
        async for msg in self.ws:
            now = time.monotonic()
            if isinstance(msg, str):
                reply = decode_text_reply(msg, self.d_output, keep)
                if reply.kind == "control":
                    if reply.message and reply.message.get("type") == "end":
                        samples = reply.message.get("samples")
                        self.rec.end_mismatch = samples != self.answered_samples
                        return
                    continue
            else:
                wanted = keep and self.kept_rows < self.plan.verify_max_samples
                reply = decode_binary_reply(msg, self.d_output, wanted)
            self.on_reply(reply, now)

    def finish(self) -> SessionRecord:
        rec = self.rec
        rec.lost = len(self.pending) + len(self.missing)
        rec.sent_at = np.frombuffer(self.sent_at, dtype=np.float64)
        rec.latency = np.frombuffer(self.latency, dtype=np.float64)
        if self.outputs and not rec.wrong:  # a garbled reply makes the comparison moot
            rec.verify_outputs = np.concatenate(self.outputs)[: self.plan.verify_max_samples]
            rec.verify_inputs = np.concatenate(self.inputs)[: self.plan.verify_max_samples]
        return rec


def _close_code(exc: ConnectionClosed) -> int:
    return exc.rcvd.code if exc.rcvd is not None else 1006


async def run_session(
    plan: SessionPlan, ws_url: str, headers: dict[str, str], d_output: int, drain_s: float
) -> SessionRecord:
    """Connect at plan.start_at, stream until plan.stop_at, then collect late replies."""
    await asyncio.sleep(max(0.0, plan.start_at - time.monotonic()))
    max_size = max(2**20, 8 * plan.frame * max(d_output, 1) + 4096)
    try:
        ws = await connect(
            ws_url,
            compression=None,
            proxy=None,
            max_size=max_size,
            ping_interval=None,
            open_timeout=HANDSHAKE_TIMEOUT_S,
            additional_headers=headers,
            close_timeout=2,
        )
    except InvalidStatus as exc:
        return SessionRecord(plan.index, errors=Counter({f"http_{exc.response.status_code}": 1}))
    except (OSError, TimeoutError, WebSocketException) as exc:
        return SessionRecord(plan.index, errors=Counter({f"connect_{type(exc).__name__}": 1}))
    async with ws:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await ws.send(start_message(plan.wire, plan.sample_rate))
                started = json.loads(await ws.recv())
        except ConnectionClosed as exc:
            return SessionRecord(plan.index, errors=Counter({f"close_{_close_code(exc)}": 1}))
        except (TimeoutError, ValueError):
            return SessionRecord(plan.index, errors=Counter({"no_started": 1}))
        if started.get("type") != "started":
            code = started.get("code", "no_started") if isinstance(started, dict) else "no_started"
            return SessionRecord(plan.index, errors=Counter({str(code): 1}))
        stream = _Stream(plan, ws, int(started.get("d_output", d_output)))
        sender = asyncio.create_task(stream.send_loop(max(plan.start_at, time.monotonic())))
        receiver = asyncio.create_task(stream.receive_loop())
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():
                await asyncio.wait({receiver}, timeout=drain_s)
            if not receiver.done():
                stream.rec.errors["drain_timeout"] += 1
            elif isinstance(receiver.exception(), ConnectionClosed):
                code = _close_code(receiver.exception())
                if code != 1000:
                    stream.rec.errors[f"close_{code}"] += 1
            elif receiver.exception() is not None:
                raise receiver.exception()
        finally:
            sender.cancel()
            receiver.cancel()
        return stream.finish()
