"""A streaming session that survives dropped connections.

The client numbers every frame by the session index of its first sample and keeps what it
needs to rebuild the state: a recovery point (the starting state, then a `snapshot` taken every
`checkpoint_s` seconds) and every frame sent since. When the connection drops it reconnects
with backoff and resumes with the token, saying how many replies it received: replies the
server sent that never arrived are sent again first (from the session's reply ring). If the
server's state covers exactly the outputs received, the frames still unanswered are sent
again; if it covers fewer (the server was killed and the session came back from its last
checkpoint), the frames since are replayed. If it covers more and the server no longer holds
the replies (outputs lost in flight beyond its ring), the session is restarted from the
recovery point and the frames since are replayed; outputs the caller already has are not
delivered twice. Either way the caller sees every frame's outputs exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from client.connection import (
    can_replay_from,
    endpoint_url,
    open_stream,
    with_backoff,
    worth_reconnecting,
)
from client.errors import StreamError
from client.wire import WIRE_DTYPES, frame_bytes, json_frame, start_message


@dataclass(frozen=True)
class StreamOptions:
    dtype: str = "float32"
    sample_rate: float | None = None
    output: str = "every"
    state: str | None = None
    resume: str | None = None
    reconnect: bool = True
    checkpoint_s: float = 2.0
    max_reconnect_s: float = 60.0
    frames: str = "binary"  # or "json": `samples` text frames, answered with JSON outputs
    open_timeout: float = 30.0
    ping_interval: float | None = 20.0  # websockets' keepalive; None turns it off
    # the key a proxy hashes on (`?session=` on the stream URL, deploy/nginx/nginx.conf), so
    # that reconnects reach the replica holding the session; None: a random key per stream
    affinity: str | None = None


@dataclass(eq=False)
class _Frame:
    t: int  # session index of the first sample
    rows: int
    data: bytes | str
    deliver: bool = True  # False: a replay whose outputs the caller already has
    seq: int = 0  # the server's number for it: frames sent on this connection before it


@dataclass(eq=False)
class _Control:
    kind: str  # "snapshot" | "reset" | "end"
    future: asyncio.Future | None  # None: the client's own checkpoint


class AsyncStream:
    """`async with client.stream("motion") as s`: send()/feed()+recv(), snapshot(), reset(),
    end(). `info` is the server's `started` message (d_input, d_output, labels, ...)."""

    def __init__(self, url: str, model: str, options: StreamOptions,
                 token: str | None = None,
                 on_output: Callable[[np.ndarray | StreamError], None] | None = None) -> None:
        self.ws_url = endpoint_url(url, model, "stream", options.affinity)
        self.options = options
        self.token = token
        self.info: dict[str, Any] = {}
        self.reconnects = 0
        self.replayed = 0  # samples sent again after a resume from an earlier state
        self.stray_replies = 0  # messages that answered nothing we sent (a server bug)
        self._ws: ClientConnection | None = None
        self._pending: deque[_Frame | _Control] = deque()  # sent, reply not yet received
        self._kept: deque[_Frame] = deque()  # answered frames since the recovery point
        self._base: tuple[int, str | None] = (0, options.state)  # recovery point
        self._sent = 0  # session index of the next frame's first sample
        self._received = 0  # samples whose outputs have arrived
        self._replies = 0  # replies received in this session (the server counts them too)
        self._outputs: asyncio.Queue[np.ndarray | StreamError] = asyncio.Queue()
        # with on_output, each frame's outputs (or StreamError) go to it from the reader, in
        # order, instead of to recv(): no queue and no task switch per frame
        self._deliver = on_output or self._outputs.put_nowait
        self._queued = on_output is None  # outputs go to recv() through the queue
        self._up = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._ended = False
        self._failed: StreamError | None = None
        self._last_checkpoint = time.monotonic()
        self._seq = 0  # frames sent on the current connection

    # ----- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> AsyncStream:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if not self._ended and self._failed is None and exc[0] is None:
                await self.end()
        finally:  # also when end() fails or is cancelled: no reader or socket left behind
            await self.close()

    async def open(self) -> dict:
        opts = self.options
        self._ws, self.info = await self._connect(state=opts.state, resume=opts.resume)
        self._sent = self._received = self.info["samples"]
        # a resumed session's replies are counted over its whole life, earlier owners' too
        self._replies = self.info.get("replies", 0) - self.info.get("resent", 0)
        self._base = (self.info["samples"], opts.state)
        self._up.set()
        self._reader = asyncio.create_task(self._read())
        if opts.resume is not None and opts.reconnect:  # its state is the recovery point
            await self._send(_Control("snapshot", None), json.dumps({"type": "snapshot"}))
        return self.info

    async def close(self) -> None:
        """Stop without ending the session (it stays resumable on the server); calls still
        waiting for a reply raise StreamError("closed")."""
        open_before, self._ended = not self._ended and self._failed is None, True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if open_before:  # recv() waiters wake; an on_output callback hears nothing more
            self._fail(StreamError("closed", "the stream was closed"),
                       deliver=self._queued)

    @property
    def samples(self) -> int:
        """Samples sent so far (the session index of the next frame)."""
        return self._sent

    # ----- what callers use ------------------------------------------------------------
    async def feed(self, frame: np.ndarray | bytes) -> None:
        """Send one frame (T × d_input samples, or bytes already in the wire dtype); its
        outputs come from recv(), in order. An int16 session takes int16 samples as they are,
        or floats in [-1, 1) (scaled by 32768)."""
        opts = self.options
        if opts.frames == "json":
            block = np.asarray(frame, dtype=np.float32).reshape(-1, self.info["d_input"])
            data: bytes | str = json_frame(block)
            rows = len(block)
        else:
            data = frame if isinstance(frame, bytes) else frame_bytes(frame, opts.dtype)
            rows = len(data) // (self.info["d_input"] * WIRE_DTYPES[opts.dtype].itemsize)
        await self._ready()
        entry = _Frame(self._sent, rows, data)
        self._sent += rows
        await self._send(entry, data)
        if (self.options.reconnect and self.options.checkpoint_s
                and time.monotonic() - self._last_checkpoint >= self.options.checkpoint_s):
            self._last_checkpoint = time.monotonic()
            await self._send(_Control("snapshot", None), json.dumps({"type": "snapshot"}))

    async def recv(self) -> np.ndarray:
        """The next frame's outputs: (T or 1, d_output) float32. A rejected frame raises
        StreamError (with its `seq`); the session goes on."""
        if self._failed is not None and self._outputs.empty():  # the session is gone: its
            raise self._failed  # other frames will never be answered
        item = await self._outputs.get()
        if isinstance(item, StreamError):
            raise item
        return item

    async def send(self, frame: np.ndarray) -> np.ndarray:
        """feed() then recv(): one frame in, its outputs out."""
        await self.feed(frame)
        return await self.recv()

    async def snapshot(self) -> tuple[int, str]:
        """(samples, state blob) after every frame sent so far."""
        return await self._control("snapshot")

    async def reset(self) -> None:
        """State to zeros, sample count to 0 (after the frames sent so far)."""
        await self._control("reset")

    async def end(self) -> int:
        """Finish the session for good; returns its sample count."""
        samples = await self._control("end")
        self._ended = True
        return samples

    # ----- internals -------------------------------------------------------------------
    async def _ready(self) -> None:
        if self._failed is not None:
            raise self._failed
        await self._up.wait()
        if self._failed is not None:
            raise self._failed

    async def _control(self, kind: str) -> Any:
        await self._ready()
        if kind == "reset":  # frames sent from now on start at 0, even before the reply
            self._sent = 0
        future = asyncio.get_running_loop().create_future()
        await self._send(_Control(kind, future), json.dumps({"type": kind}))
        return await future

    async def _send(self, entry: _Frame | _Control, payload: bytes | str) -> None:
        if isinstance(entry, _Frame):
            entry.seq, self._seq = self._seq, self._seq + 1
        self._pending.append(entry)
        # a failed send is not an error: the reader sees the drop and recovery re-sends
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(payload)

    async def _connect(self, state: str | None = None, resume: str | None = None,
                       received: int | None = None) -> tuple[ClientConnection, dict]:
        opts = self.options
        return await open_stream(self.ws_url, self.token, start_message(
            opts.dtype, opts.output, opts.sample_rate, state, resume, received),
            opts.open_timeout, opts.ping_interval)

    async def _read(self) -> None:
        while True:
            try:
                async for message in self._ws:
                    self._on_reply(message)
                    if self._failed is not None:  # a rejected replay: nothing to go on with
                        await self._ws.close()
                        return
            except ConnectionClosed:
                pass
            except Exception as exc:  # a reply that fits nothing we sent: a broken server
                self._fail(StreamError("bad_reply", f"unreadable reply: {exc!r}"))
                await self._ws.close()
                return
            if self._ended:
                return
            code = self._ws.close_code
            if not worth_reconnecting(self._ws, self.options.reconnect):
                reason = self._ws.close_reason or "connection closed"
                self._fail(StreamError("closed", f"{code} {reason}", close_code=code))
                return
            try:
                await self._recover()
            except Exception as exc:
                self._fail(exc if isinstance(exc, StreamError)
                           else StreamError("closed", f"reconnect failed: {exc!r}"))
                return

    def _fail(self, error: StreamError, deliver: bool = True) -> None:
        self._failed = error
        self._up.set()  # wake waiters so they see the failure
        for entry in self._pending:
            if isinstance(entry, _Control) and entry.future and not entry.future.done():
                entry.future.set_exception(error)
        if deliver:
            self._deliver(error)

    def _on_reply(self, message: bytes | str) -> None:
        if not self._pending:  # nothing asked for this: not a reply of ours
            self.stray_replies += 1
            return
        entry = self._pending.popleft()
        self._replies += 1
        if isinstance(message, bytes):
            values = np.frombuffer(message, "<f4", len(message) // 4)  # a torn float is wrong
            self._answered(entry, values if len(message) % 4 == 0 else values[:0])
            return
        reply = json.loads(message)
        kind = reply.get("type")
        if kind == "outputs" and isinstance(entry, _Frame):  # the answer to a JSON frame
            if (reply.get("seq"), reply.get("t")) != (entry.seq, entry.t):
                self._answered(entry, StreamError(
                    "bad_reply", f"outputs for seq {reply.get('seq')} t {reply.get('t')}, "
                    f"expected seq {entry.seq} t {entry.t}", entry.seq))
                return
            self._answered(entry, np.asarray(reply["data"], np.float32))
            return
        if kind == "error":
            error = StreamError(reply["code"], reply["message"], reply.get("seq"))
            if isinstance(entry, _Frame) and not entry.deliver:
                self._fail(StreamError(error.code, f"a replayed frame was rejected: {error}"))
                return
            if isinstance(entry, _Frame):  # not applied: later frames start earlier
                for later in self._pending:
                    if isinstance(later, _Frame):
                        later.t -= entry.rows
                self._sent -= entry.rows
                if entry.deliver:
                    self._deliver(error)
            elif entry.future is not None:
                entry.future.set_exception(error)
            return
        if kind == "snapshot":
            self._base = (reply["samples"], reply["state"])
            while self._kept and self._kept[0].t < reply["samples"]:
                self._kept.popleft()
            if entry.future is not None:
                entry.future.set_result((reply["samples"], reply["state"]))
        elif kind == "reset":  # _sent went to 0 when it was asked for
            self._base, self._received = (0, None), 0
            self._kept.clear()
            entry.future.set_result(None)
        elif kind == "end":
            self._ended = True
            entry.future.set_result(reply["samples"])

    def _answered(self, entry: _Frame, outputs: np.ndarray | StreamError) -> None:
        """A frame's reply: its outputs, or a StreamError when the reply does not fit it (a
        broken server or proxy; the frame counts as applied)."""
        self._received = entry.t + entry.rows
        if self.options.reconnect:  # kept for a replay until the next checkpoint
            self._kept.append(entry)
        d_output = self.info["d_output"]
        rows = entry.rows if self.options.output == "every" else 1
        if isinstance(outputs, np.ndarray):
            if outputs.size != rows * d_output:
                outputs = StreamError("bad_reply", f"{outputs.size} output values for a frame "
                                      f"of {entry.rows} samples", entry.seq)
            else:
                outputs = outputs.reshape(rows, d_output)
        if entry.deliver:
            self._deliver(outputs)

    async def _recover(self) -> None:
        """Reconnect, resume (or restart from the recovery point), replay."""
        self._up.clear()
        ws, info = await with_backoff(self._reconnect_once, self.options.max_reconnect_s)
        self._ws, self.info = ws, info
        self.reconnects += 1
        start = info["samples"]
        replay = [f for f in self._kept if f.t >= start]
        self.replayed += sum(f.rows for f in replay)
        resent = info.get("resent", 0)
        if "replies" in info:  # count as the server does from here on
            self._replies = info["replies"] - resent
        # the replies the server sends again answer our first entries, in order
        head, pending = list(self._pending)[:resent], list(self._pending)[resent:]
        self._pending = deque(head)
        self._kept = deque(f for f in self._kept if f.t < start)
        self._seq = 0
        for frame in replay:
            frame.deliver = False
        for entry in replay + pending:  # a drop meanwhile: the reader recovers again
            await self._send(entry, entry.data if isinstance(entry, _Frame)
                             else json.dumps({"type": entry.kind}))
        self._up.set()

    def _resume_fits(self, info: dict) -> bool:
        """Can we go on from this resumed state? Yes when the server sends again every reply
        we missed, or its state ends where our outputs do, or is behind them (replay)."""
        replies, resent = info.get("replies"), info.get("resent", 0)
        if replies is not None and resent and replies == self._replies + resent:
            return resent <= len(self._pending)
        if replies is not None and replies > self._replies + resent:
            return False  # replies lost beyond what the server keeps: start over
        return can_replay_from(info["samples"], self._base[0], self._received, self._kept)

    async def _reconnect_once(self) -> tuple[ClientConnection, dict]:
        try:
            ws, info = await self._connect(resume=self.info["resume_token"],
                                           received=self._replies)
        except StreamError as exc:
            if exc.code != "resume_not_found":
                raise
            ws, info = None, None
        if info is not None and self._resume_fits(info):
            return ws, info  # missed replies come again, or resend the rest, or replay
        if ws is not None:  # outputs were lost in flight: start over from the recovery point
            await ws.send(json.dumps({"type": "end"}))
            with contextlib.suppress(ConnectionClosed):
                await ws.recv()
            await ws.close()
        base_samples, base_state = self._base
        ws, info = await self._connect(state=base_state)
        self._replies = 0  # a new session
        if info["samples"] != base_samples:
            await ws.close()
            raise StreamError("bad_state", "the recovery point did not restore")
        return ws, info
