"""Many sessions over one connection (WS /v1/models/{name}/mux, format v1).

    async with client.mux("motion") as m:
        a, b = await m.open(), await m.open(sample_rate=20)
        out = await m.send({a: np.zeros((1, 6), np.float32), b: np.zeros((4, 6), np.float32)})
        out[a]                           # (1, d_output) outputs, or a StreamError for that entry
        await m.end(a)

With `reconnect` (the default) a dropped connection is reconnected with backoff and every
session is resumed by its token, as AsyncStream does for one stream: a session whose state
covers exactly the outputs received gets its unanswered entries again; one whose state covers
more (replies lost in flight) or that is gone is restarted from its recovery point (its state
at open, then a snapshot every `checkpoint_s`) and the entries since are replayed without
delivering outputs twice. Session ids stay the same for the caller across reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from client.connection import endpoint_url, open_ws, with_backoff, worth_reconnecting
from client.errors import StreamError
from client.mux_recovery import Entry, Pending, Session, decode_outputs, reopen
from client.wire import encode_data, frame_bytes


class AsyncMux:
    """One mux connection; sessions are small integers (`sid`) on it."""

    def __init__(self, url: str, model: str, token: str | None = None, *,
                 reconnect: bool = True, checkpoint_s: float = 2.0,
                 max_reconnect_s: float = 60.0, affinity: str | None = None) -> None:
        self.ws_url = endpoint_url(url, model, "mux", affinity)
        self.token = token
        self.reconnect, self.checkpoint_s, self.max_reconnect_s = (
            reconnect, checkpoint_s, max_reconnect_s)
        self.sessions: dict[int, dict] = {}  # sid -> its "opened" message
        self.reconnects = 0
        self._ws: ClientConnection | None = None
        self._seq = 0
        self._data: deque[Pending] = deque()
        self._opening: dict[str, asyncio.Future] = {}  # open's ref -> its waiter
        # server sid -> (the reply's type, its waiter or None) of each control, as sent
        self._asked: dict[int, deque[tuple[str, asyncio.Future | None]]] = {}
        self._state: dict[int, Session] = {}
        self._server_sid: dict[int, int] = {}  # caller's sid -> the current connection's
        self._caller_sid: dict[int, int] = {}
        self._up = asyncio.Event()
        self._failed: StreamError | None = None
        self._closing = False
        self._reader: asyncio.Task | None = None
        self._closed_sessions: dict[int, str] = {}

    # ----- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> AsyncMux:
        self._ws = await self._connect()
        self._up.set()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Detach every session (resumable by token); calls still waiting raise."""
        self._closing = True
        if self._reader is not None:  # also when it is reconnecting
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._failed is None:
            self._fail(StreamError("closed", "the mux was closed"))

    async def _connect(self) -> ClientConnection:
        return await open_ws(self.ws_url, self.token)

    # ----- what callers use ------------------------------------------------------------
    async def open(self, *, dtype: str = "float32", sample_rate: float | None = None,
                   output: str = "every", state: str | None = None,
                   resume: str | None = None) -> int:
        """A new (or resumed) session on this connection; returns its sid."""
        options = {"dtype": dtype, "output": output}
        if sample_rate is not None:
            options["sample_rate"] = sample_rate
        extra = {"state": state} if state is not None else {}
        if resume is not None:
            extra = {"resume": resume}
        opened = await self._open(options | extra)
        sid = opened["sid"]
        self._server_sid[sid] = self._caller_sid[sid] = sid  # the same until a reconnect
        self.sessions[sid] = opened
        self._state[sid] = Session(options, opened["resume_token"],
                                    (opened["samples"], state), opened["samples"],
                                    opened["samples"])
        if resume is not None and self.reconnect:  # its state is the recovery point
            await self._checkpoint(sid, self._state[sid])
        return sid

    async def send(self, frames: dict[int, np.ndarray]) -> dict[int, Any]:
        """One data message: each session's frame -> its outputs (or a StreamError)."""
        entries = []
        for sid, frame in frames.items():
            info = self.sessions.get(sid, {"dtype": "float32"})
            samples = int(np.prod(np.shape(frame)[:-1])) if np.ndim(frame) > 1 else 1
            entries.append((sid, frame_bytes(frame, info["dtype"]), samples))
        return dict(await self.send_raw(entries))

    async def send_raw(self, entries: list[tuple[int, bytes, int]]) -> list[tuple[int, Any]]:
        """(sid, payload bytes, samples) per entry -> (sid, outputs or StreamError) each."""
        await self._ready()
        if not self.reconnect:  # nothing to replay: no bookkeeping per entry
            future = asyncio.get_running_loop().create_future()
            self._seq += 1
            self._data.append(Pending(self._seq, None, future))
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(encode_data(self._seq, entries))
            return await future
        items = []
        for sid, payload, samples in entries:
            session = self._state.get(sid)
            entry = Entry(session.sent if session else 0, payload, samples)
            if session is not None:
                session.sent += samples
            items.append((sid, entry))
        future = asyncio.get_running_loop().create_future()
        await self._send_data(Pending(0, items, future))
        if self.reconnect and self.checkpoint_s:
            now = time.monotonic()
            for sid, _ in items:
                session = self._state.get(sid)
                if session is not None and now - session.checkpoint_at >= self.checkpoint_s:
                    await self._checkpoint(sid, session)
        return await future

    async def snapshot(self, sid: int) -> tuple[int, str]:
        reply = await self._ask("snapshot", sid)
        return reply["samples"], reply["state"]

    async def reset(self, sid: int) -> None:
        session = self._state.get(sid)
        if session is not None:  # entries sent from now on start at 0, even before the reply
            session.sent = 0
        await self._ask("reset", sid)

    async def end(self, sid: int) -> int:
        reply = await self._ask("end", sid)
        self._forget(sid)
        return reply["samples"]

    async def detach(self, sid: int) -> int:
        """Leave the session resumable (by its token, on a mux or a plain stream)."""
        reply = await self._ask("close", sid, answer="closed")
        self._forget(sid)
        return reply["samples"]

    # ----- internals -------------------------------------------------------------------
    async def _ready(self) -> None:
        if self._failed is not None:
            raise self._failed
        await self._up.wait()
        if self._failed is not None:
            raise self._failed

    def _forget(self, sid: int) -> None:
        self.sessions.pop(sid, None)
        self._state.pop(sid, None)
        self._caller_sid.pop(self._server_sid.pop(sid, -1), None)

    async def _open(self, message: dict) -> dict:
        await self._ready()
        ref = f"r{id(message)}-{time.monotonic_ns()}"
        future = asyncio.get_running_loop().create_future()
        self._opening[ref] = future
        await self._send_text({"type": "open", "ref": ref, **message})
        return await future

    async def _ask(self, kind: str, sid: int, answer: str | None = None,
                   wait: bool = True) -> dict | None:
        """A control; a session's controls are answered in the order sent, so every reply, an
        error too (which names no kind), answers its oldest one (`_asked`)."""
        await self._ready()
        future = asyncio.get_running_loop().create_future() if wait else None
        server_sid = self._server_sid.get(sid, 0)
        self._asked.setdefault(server_sid, deque()).append((answer or kind, future))
        await self._send_text({"type": kind, "sid": server_sid})
        return await future if future is not None else None

    async def _checkpoint(self, sid: int, session: Session) -> None:
        """Ask for a snapshot that becomes the session's recovery point (no caller waits)."""
        session.checkpoint_at = time.monotonic()
        await self._ask("snapshot", sid, wait=False)

    async def _send_text(self, message: dict) -> None:
        with contextlib.suppress(ConnectionClosed):  # the reader sees the drop
            await self._ws.send(json.dumps(message))

    async def _send_data(self, pending: Pending, ws: ClientConnection | None = None) -> None:
        self._seq += 1
        pending.seq = self._seq
        self._data.append(pending)
        # 0 is no session's id on any connection: an unknown sid stays unknown
        body = encode_data(self._seq, [(self._server_sid.get(sid, 0), e.payload, e.samples)
                                       for sid, e in pending.entries])
        with contextlib.suppress(ConnectionClosed):
            await (ws or self._ws).send(body)

    async def _read(self) -> None:
        while True:
            try:
                async for message in self._ws:
                    if isinstance(message, bytes):
                        self._on_outputs(message)
                    else:
                        self._on_text(json.loads(message))
            except ConnectionClosed:
                pass
            except Exception as exc:  # a reply that does not fit: nothing can be trusted
                self._fail(exc if isinstance(exc, StreamError)
                           else StreamError("bad_reply", f"unreadable reply: {exc!r}"))
                await self._ws.close()
                return
            code = self._ws.close_code
            if self._closing or not worth_reconnecting(self._ws, self.reconnect):
                self._fail(StreamError("closed", f"the mux connection closed ({code})",
                                       close_code=code))
                return
            try:
                await self._recover()
            except Exception as exc:
                self._fail(exc if isinstance(exc, StreamError)
                           else StreamError("closed", f"reconnect failed: {exc!r}"))
                return

    def _fail(self, error: StreamError) -> None:
        self._failed = error
        self._up.set()
        for pending in self._data:
            if pending.future is not None and not pending.future.done():
                pending.future.set_exception(error)
        self._data.clear()
        self._fail_controls(error)

    def _fail_controls(self, error: StreamError) -> None:
        waiting = [*self._opening.values()]
        for asked in self._asked.values():
            waiting += [future for _, future in asked]
        for future in waiting:
            if future is not None and not future.done():
                future.set_exception(error)
        self._opening.clear()
        self._asked.clear()

    def _on_outputs(self, message: bytes) -> None:
        d_out = next(iter(self.sessions.values()), {}).get("d_output", 1)
        seq, replies = decode_outputs(message, d_out)
        pending = self._data.popleft()
        if seq != pending.seq:
            raise StreamError("bad_reply", f"reply {seq} for message {pending.seq}")
        if pending.entries is None:  # without reconnect, sids are the server's
            pending.future.set_result(replies)
            return
        if len(replies) != len(pending.entries):
            raise StreamError("bad_reply", f"{len(replies)} entries answered, "
                              f"{len(pending.entries)} sent")
        results = []
        for (sid, entry), (_, out) in zip(pending.entries, replies, strict=True):
            session = self._state.get(sid)
            if isinstance(out, StreamError):
                if not entry.deliver:
                    raise StreamError(out.code, f"a replayed entry was rejected: {out}")
                self._unapplied(sid, entry)
            elif session is not None:  # a replay's reply does not take it back
                session.received = max(session.received, entry.t + entry.samples)
                if self.reconnect:
                    session.kept.append(entry)
            results.append((sid, out))
        if pending.future is not None and not pending.future.done():
            pending.future.set_result(results)

    def _unapplied(self, sid: int, entry: Entry) -> None:
        """An entry the server refused: the session's later entries start earlier."""
        session = self._state.get(sid)
        if session is None:
            return
        for later in self._data:
            for other, e in later.entries or ():
                if other == sid:
                    e.t -= entry.samples
        session.sent -= entry.samples

    def _on_text(self, reply: dict) -> None:
        kind = reply.get("type")
        if kind == "error" and "seq" in reply and "sid" not in reply and self._data:
            pending = self._data.popleft()  # a whole data message was unreadable
            for sid, entry in pending.entries or ():
                if not entry.deliver:
                    raise StreamError(reply["code"], "a replay message was refused")
                self._unapplied(sid, entry)
            if pending.future is not None:
                pending.future.set_exception(StreamError(reply["code"], reply["message"]))
            return
        if kind == "closed" and reply.get("reason") != "close":
            sid = self._caller_sid.get(reply["sid"], reply["sid"])
            self._closed_sessions[sid] = reply["reason"]
            self._forget(sid)
            for _, future in self._asked.pop(reply["sid"], ()):  # never answered
                if future is not None and not future.done():
                    future.set_exception(StreamError(reply["reason"],
                                                     "the session left this connection"))
            return
        if kind == "snapshot":
            session = self._state.get(self._caller_sid.get(reply.get("sid"), -1))
            if session is not None:
                session.base = (reply["samples"], reply["state"])
                while session.kept and session.kept[0].t < reply["samples"]:
                    session.kept.popleft()
        elif kind == "reset":
            session = self._state.get(self._caller_sid.get(reply.get("sid"), -1))
            if session is not None:  # sent went to 0 when it was asked for
                session.base, session.received = (0, None), 0
                session.kept.clear()
        if kind == "opened" or (kind == "error" and "ref" in reply):
            future = self._opening.pop(reply.get("ref"), None)
        else:
            asked = self._asked.get(reply.get("sid"))
            if not asked or kind not in ("error", asked[0][0]):
                return  # it answers nothing asked
            future = asked.popleft()[1]
            if not asked:
                del self._asked[reply["sid"]]
        if future is None or future.done():
            return
        if kind == "error":
            future.set_exception(StreamError(reply["code"], reply["message"]))
        else:
            future.set_result(reply)

    # ----- recovery --------------------------------------------------------------------
    async def _recover(self) -> None:
        """Reconnect, resume or restart every session, replay, re-send what was unanswered."""
        self._up.clear()
        self._fail_controls(StreamError("closed", "the connection dropped; ask again"))
        unanswered = [p for p in self._data if p.future is not None]
        for pending in self._data:  # an earlier recovery's replay, cut short: replay it again
            if pending.future is None and pending.entries:
                for sid, entry in pending.entries:
                    if sid in self._state:
                        self._state[sid].kept.append(entry)
        self._data.clear()
        ws, reopened = await with_backoff(self._reconnect_once, self.max_reconnect_s)
        self._ws = ws
        self.reconnects += 1
        self._server_sid.clear()
        self._caller_sid.clear()
        replays: list[list[tuple[int, Entry]]] = []
        for sid, (opened, start) in reopened.items():
            session = self._state[sid]
            self._server_sid[sid], self._caller_sid[opened["sid"]] = opened["sid"], sid
            self.sessions[sid] = opened
            replay = [e for e in session.kept if e.t >= start]
            session.kept = deque(e for e in session.kept if e.t < start)
            for i, entry in enumerate(replay):
                entry.deliver = False
                if i == len(replays):
                    replays.append([])
                replays[i].append((sid, entry))
        for items in replays:  # round i: the i-th replayed entry of every session
            await self._send_data(Pending(0, items, None), ws)
        for pending in unanswered:
            await self._send_data(pending, ws)
        self._up.set()

    async def _reconnect_once(self) -> tuple[ClientConnection, dict[int, tuple[dict, int]]]:
        """A new connection with every session open on it, or an error and none left open
        (with_backoff tries again: a server restarting or draining refuses for a while)."""
        ws = await self._connect()
        try:
            return ws, {sid: await reopen(ws, session)
                        for sid, session in list(self._state.items())}
        except BaseException:
            await asyncio.shield(ws.close())
            raise
