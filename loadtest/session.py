"""One streaming session: send frames on a fixed schedule through the client library's
AsyncStream (no reconnect: a drop is a failure here), check every reply as it comes back."""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from websockets.exceptions import WebSocketException

from client.errors import StreamError
from client.stream import AsyncStream, StreamOptions
from client.wire import frame_bytes

HANDSHAKE_TIMEOUT_S = 30.0


@dataclass
class SessionPlan:
    """What one session sends and when (times are time.monotonic() seconds)."""

    index: int
    start_at: float
    stop_at: float
    period_s: float
    frame: int
    wire: str  # float32 | int16 | json
    seen: np.ndarray  # (loop_len, d_input) float32 values as the server decodes them
    verify: bool
    verify_max_samples: int
    max_in_flight: int
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        self.loop_frames = len(self.seen) // self.frame
        # binary frames are encoded once; the server decodes exactly `seen` from them
        self._encoded = frame_bytes(self.seen, self.wire) if self.wire != "json" else b""
        self._frame_bytes = len(self._encoded) // max(self.loop_frames, 1)

    def block(self, k: int) -> np.ndarray:
        """Frame k's (T, d_input) values; the signal repeats after loop_frames frames."""
        j = k % self.loop_frames
        return self.seen[j * self.frame : (j + 1) * self.frame]

    def payload(self, k: int) -> bytes | np.ndarray:
        """What AsyncStream.feed gets for frame k."""
        if self.wire == "json":
            return self.block(k)
        j = k % self.loop_frames
        return self._encoded[j * self._frame_bytes : (j + 1) * self._frame_bytes]

    def options(self) -> StreamOptions:
        return StreamOptions(
            dtype="int16" if self.wire == "int16" else "float32",
            sample_rate=self.sample_rate,
            frames="json" if self.wire == "json" else "binary",
            reconnect=False,
            checkpoint_s=0.0,
            open_timeout=HANDSHAKE_TIMEOUT_S,
            ping_interval=None,
        )


@dataclass
class SessionRecord:
    """Everything one session observed; plain data so worker processes can return it."""

    index: int
    connected: bool = False
    frames_sent: int = 0
    replies_ok: int = 0
    lost: int = 0
    duplicated: int = 0  # replies that answered no frame
    wrong: int = 0
    end_mismatch: bool = False
    errors: Counter = field(default_factory=Counter)
    max_send_lag_s: float = 0.0
    stalls: int = 0
    sent_at: np.ndarray | None = None  # send times (s, monotonic) of answered frames
    latency: np.ndarray | None = None  # send -> reply seconds, same order
    verify_inputs: np.ndarray | None = None
    verify_outputs: np.ndarray | None = None


class _Run:
    """A session's sender and receiver around one AsyncStream."""

    def __init__(self, plan: SessionPlan):
        self.plan = plan
        self.stream: AsyncStream | None = None
        self.rec = SessionRecord(plan.index, connected=True)
        self.pending: deque[tuple[float, int]] = deque()  # (sent at, frame number)
        self.room = asyncio.Event()  # set when a reply frees room for one more frame
        self.settled = asyncio.Event()  # every sent frame answered, or the stream failed
        self.sent_at, self.latency = array("d"), array("d")
        self.outputs: list[np.ndarray] = []
        self.inputs: list[np.ndarray] = []
        self.kept_rows = 0
        self.answered_samples = 0
        self.sending = True
        self.closed = False

    async def send_loop(self, stream_start: float) -> None:
        plan, rec = self.plan, self.rec
        k, due = 0, stream_start
        try:
            while due < plan.stop_at and not self.closed:
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    rec.max_send_lag_s = max(rec.max_send_lag_s, now - due)
                while len(self.pending) >= plan.max_in_flight and not self.closed:
                    rec.stalls += 1
                    self.room.clear()
                    await self.room.wait()
                self.pending.append((time.monotonic(), k))
                await self.stream.feed(plan.payload(k))
                rec.frames_sent = k = k + 1
                due = stream_start + k * plan.period_s
        except StreamError:  # the stream failed; the receiver records why
            pass
        finally:
            self.sending = False
            if not self.pending:
                self.settled.set()

    def on_output(self, outputs: np.ndarray | StreamError) -> None:
        """Each frame's outputs, in order, straight from the stream's reader."""
        plan, rec = self.plan, self.rec
        now = time.monotonic()
        if isinstance(outputs, StreamError):
            if outputs.code == "closed":
                rec.errors[f"close_{outputs.close_code or 1006}"] += 1
                self.closed = True
                self.settled.set()
                self.room.set()
                return
            if not self.pending:
                return
            self.pending.popleft()
            if outputs.code == "bad_reply":  # a reply that does not fit its frame
                rec.wrong += 1
                self.answered_samples += plan.frame
            else:  # a rejected frame: the server's state did not move
                rec.errors[outputs.code] += 1
        else:
            if not self.pending:
                return
            sent, k = self.pending.popleft()
            rec.replies_ok += 1  # the client library checked its size against the frame
            self.sent_at.append(sent)
            self.latency.append(now - sent)
            if plan.verify and self.kept_rows < plan.verify_max_samples:
                self.outputs.append(outputs.copy())
                self.inputs.append(plan.block(k))
                self.kept_rows += len(outputs)
            self.answered_samples += plan.frame
        self.room.set()
        if not self.sending and not self.pending:
            self.settled.set()

    def finish(self) -> SessionRecord:
        rec = self.rec
        rec.lost = len(self.pending)
        rec.duplicated = self.stream.stray_replies
        rec.sent_at = np.frombuffer(self.sent_at, dtype=np.float64)
        rec.latency = np.frombuffer(self.latency, dtype=np.float64)
        if self.outputs and not rec.wrong:  # a garbled reply makes the comparison moot
            rec.verify_outputs = np.concatenate(self.outputs)[: self.plan.verify_max_samples]
            rec.verify_inputs = np.concatenate(self.inputs)[: self.plan.verify_max_samples]
        return rec


async def run_session(plan: SessionPlan, url: str, model: str, token: str | None,
                      drain_s: float) -> SessionRecord:
    """Connect at plan.start_at, stream until plan.stop_at, collect late replies, end."""
    await asyncio.sleep(max(0.0, plan.start_at - time.monotonic()))
    run = _Run(plan)
    stream = run.stream = AsyncStream(url, model, plan.options(), token, on_output=run.on_output)
    try:
        await stream.open()
    except StreamError as exc:
        code = f"close_{exc.close_code}" if exc.code == "closed" else exc.code
        return SessionRecord(plan.index, errors=Counter({code: 1}))
    except (OSError, TimeoutError, WebSocketException) as exc:
        return SessionRecord(plan.index, errors=Counter({f"connect_{type(exc).__name__}": 1}))
    try:
        await run.send_loop(max(plan.start_at, time.monotonic()))
        try:
            await asyncio.wait_for(run.settled.wait(), drain_s)
        except TimeoutError:
            run.rec.errors["drain_timeout"] += 1
        if not run.closed and not run.pending:
            try:
                async with asyncio.timeout(drain_s):
                    samples = await stream.end()
                run.rec.end_mismatch = samples != run.answered_samples
            except (StreamError, TimeoutError):
                run.rec.errors["no_end"] += 1
    finally:
        await stream.close()
    return run.finish()
