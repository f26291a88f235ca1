"""WS /v1/models/{name}/mux: many sessions of one model over one connection (format v1).

Sessions are opened, reset, snapshotted, closed and ended with JSON text messages; data moves
in binary messages that carry samples for any subset of the connection's sessions, answered by
one binary message with each entry's outputs in the same order (docs/protocol.md). Every entry
is queued on its own session like a stream frame, so batching, ordering, the non-finite and
overload rules and the numbers are those of a plain stream; a bad entry is answered with a
status for that entry alone. The common message (one float32 sample for each of distinct
sessions, none of them with anything queued) is stepped at once, in one call, and answered
from the same callback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket

from client.wire import ENTRY_OUT, HEADER, KIND_DATA, KIND_OUTPUTS, STATUS, WIRE_DTYPES
from client.wire import MUX_VERSION as VERSION
from server.errors import ServeError
from server.link import Link, peer_for
from server.mux_direct import DirectPath
from server.mux_table import (
    Handle,
    HandleTable,
    Message,
    read_entries,
    reply_body,
)
from server.protocol import binary_frame, parse_start, parse_text
from server.scheduler import Batch, Control, Frame
from server.sessions import Session

router = APIRouter()


@router.websocket("/v1/models/{name}/mux")
async def mux(websocket: WebSocket, name: str) -> None:
    await websocket.accept()
    await MuxConnection(websocket.app.state.runtime, peer_for(websocket), websocket).serve(name)


class MuxConnection(DirectPath, Link):
    def __init__(self, runtime, peer, websocket) -> None:
        super().__init__(runtime, peer, websocket)
        self.handles = HandleTable()
        self._next_sid = 1
        self._messages: dict[int, Message] = {}
        self._order: deque[int] = deque()
        self._next_message = 0
        self._inflight = 0
        self._controls = 0  # control items on the queues of this connection's sessions
        self._resuming = 0  # opens waiting for a resume: they count against the limit
        self._paths: dict = {}  # mux_messages by path, this model
        self._tasks: set[asyncio.Task] = set()

    # ----- lifecycle ---------------------------------------------------------------------
    def _let_go(self) -> None:
        for handle in self.handles.values():
            if handle.session is not None:
                self.rt.manager.detach(handle.session, handle)
        self.handles.clear()

    def _drop(self, handle: Handle, reason: str) -> None:
        if self.handles.pop(handle.sid) is None:
            return
        self._controls -= handle.controls  # dropped with its queue
        handle.controls = 0
        self.peer.send_text(json.dumps({"type": "closed", "sid": handle.sid, "reason": reason}))

    # ----- incoming ----------------------------------------------------------------------
    def _handle(self, data: bytes | str) -> None:
        if type(data) is bytes:
            self._data(data)
        else:
            self._text(data)

    def _text(self, data: str) -> None:
        message: dict = {}
        try:
            message = parse_text(data)
            kind = message["type"]
            if kind == "open":
                self._open(message)
                return
            if kind not in ("reset", "snapshot", "end", "close"):
                raise ServeError("unknown_type", f"unknown message type {kind!r}")
            sid = message.get("sid")
            if type(sid) is not int:
                raise ServeError("bad_request", "sid must be an integer")
            handle = self.handles.get(sid)
            if handle is None or handle.session is None:
                raise ServeError("unknown_session", f"no session {sid!r} here")
            # applied after the entries sent before it, and answered in its place in the
            # connection's order (after the replies to those entries' messages)
            self._queue(handle, Control(kind, seq=self._slot(Message(0, [None], 1, 0,
                                                                     text=True))))
            self._sent_one()
        except ServeError as err:
            self.rt.error(err.code)
            reply = err.ws_message()
            for key in ("sid", "ref"):
                if isinstance(message, dict) and key in message:
                    reply[key] = message[key]
            if message.get("type") == "open":  # answered at once, like `opened`
                self.peer.send_text(json.dumps(reply))
                return
            self._text_in_place(json.dumps(reply))

    def _open(self, message: dict) -> None:
        ref = message.get("ref")
        if len(self.handles) + self._resuming >= self.settings.mux_max_sessions:
            raise ServeError("too_many_sessions", f"at most {self.settings.mux_max_sessions} "
                             "sessions per connection")
        opts = parse_start({k: v for k, v in message.items() if k != "ref"} | {"type": "start"})
        if opts.received is not None:
            raise ServeError("bad_request", "received is for streams: a mux resumes its "
                             "sessions from `samples`")
        handle = Handle(self, self._next_sid, ref=ref)
        manager = self.rt.manager
        if opts.resume is not None:
            elsewhere = manager.maybe_elsewhere(opts.resume, self.rt.handoff or self.rt.replicas)
            resumed = None if elsewhere else self.resume_now(opts.resume, handle)
            if resumed is None:
                # live on another worker (ask it), or not stored yet (wait for it):
                # "opened" (or the error) comes when it answers
                self._next_sid += 1
                self._resuming += 1
                task = asyncio.ensure_future(self._resume_later(handle, opts.resume, elsewhere))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            session, samples = resumed
        else:
            if self.rt.scheduler.overloaded(self.model.pool):
                raise ServeError("overloaded", "the server is past capacity: retry later")
            session = manager.open(self.model, opts, handle)
            samples = session.stream.samples
        self._next_sid += 1
        self._opened(handle, session, samples)

    def _opened(self, handle: Handle, session: Session, samples: int) -> None:
        handle.session = session
        self.handles.add(handle)
        opened = session.started_message(samples)
        opened.update(type="opened", sid=handle.sid, ref=handle.ref)
        self.peer.send_text(json.dumps(opened))

    async def _resume_later(self, handle: Handle, token: str, elsewhere: bool) -> None:
        try:
            resumed = await self.resume_later(token, handle, elsewhere)
        except ServeError as err:
            self.rt.error(err.code)
            self.peer.send_text(json.dumps({**err.ws_message(), "ref": handle.ref}))
            return
        finally:
            self._resuming -= 1
        if resumed is not None:
            self._opened(handle, *resumed)

    def _data(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            self._bad_message(0, f"a data message starts with a {HEADER.size}-byte header")
            return
        version, kind, _, seq, count = HEADER.unpack_from(data)
        if version != VERSION or kind != KIND_DATA:
            self._bad_message(seq, f"expected version {VERSION} kind {KIND_DATA}")
            return
        if count > self.settings.mux_max_entries:
            self._bad_message(seq, f"at most {self.settings.mux_max_entries} entries")
            return
        received = time.perf_counter()
        if not self._paths:  # a label lookup takes a lock: once per connection
            self._paths = {path: self.rt.metrics.mux_messages.labels(self.model.info.name, path)
                           for path in ("batched", "per_entry")}
        if self._fast(data, seq, count, received):
            return
        self._paths["per_entry"].inc()
        entries, stop, end = read_entries(self.handles, data, count, self.model.info.d_input)
        if stop is None and end < len(data):  # a client that miscounted is told, rather
            # than some of its samples left unread: nothing of it is applied
            self._bad_message(seq, f"the message holds more than its {count} entries")
            return
        index = self._slot(Message(seq, [None] * count, count, count))
        scheduler = self.rt.scheduler
        for entry, handle, payload, samples in entries:
            status = self._submit(handle, index, entry, payload, samples, received, scheduler)
            if status:
                self._entry(index, entry, handle.sid, status, None)
        if stop is not None:
            first, status, sid = stop
            for rest in range(first, count):
                self._entry(index, rest, sid, status, None)
        self._sent_one()

    def _sent_one(self) -> None:
        self._inflight += 1
        if self._inflight >= self.settings.session_queue:
            self._pause()
        self._flush()

    def batch_done(self, batch: Batch, outputs: np.ndarray, status: np.ndarray) -> None:
        message = self._messages.get(batch.ref)
        if message is None:
            return
        message.parts = [reply_body(message.sids, outputs, status, self.rt.error)]
        message.left = 0
        if self._order and self._order[0] == batch.ref:
            self._flush()

    def _submit(self, handle: Handle, index: int, entry: int, payload: bytes, samples: int,
                received: float, scheduler) -> int:
        session = handle.session
        if samples == 0 or len(payload) != samples * self.model.info.d_input * (
                WIRE_DTYPES[session.dtype].itemsize):
            self.rt.error("bad_shape")
            return STATUS["bad_shape"]
        try:
            frame = binary_frame(payload, session.dtype, self.model.info.d_input)
        except ServeError as err:
            self.rt.error(err.code)
            return STATUS.get(err.code, STATUS["bad_shape"])
        if scheduler.overloaded(session.stream.pool):
            self.rt.error("overloaded")
            return STATUS["overloaded"]
        self._queue(handle, Frame(frame, index, received, False, entry=entry))
        return 0

    def _bad_message(self, seq: int, message: str) -> None:
        """A message that cannot be read at all: one text error in its reply slot."""
        self.rt.error("bad_request")
        self._text_in_place(json.dumps({"type": "error", "code": "bad_request", "seq": seq,
                                        "message": message}))

    def _text_in_place(self, text: str) -> None:
        """A text reply in its place, after the replies to the data sent before it."""
        self._slot(Message(0, [text.encode()], 0, 0, text=True))
        self._sent_one()

    def _slot(self, message: Message) -> int:
        """A place in the connection's order of replies for `message`; its index."""
        index = self._next_message
        self._next_message += 1
        self._messages[index] = message
        self._order.append(index)
        return index

    def _queue(self, handle: Handle, item: Frame | Control) -> None:
        stream = handle.session.stream
        if type(item) is Control:
            if not stream.queue:
                self.rt.scheduler.apply(stream, item)
                return
            item.queued = True
            handle.controls += 1
            self._controls += 1
        self.rt.scheduler.submit(stream, item)

    # ----- replies -----------------------------------------------------------------------
    def _entry(self, index: int, entry: int, sid: int, status: int,
               outputs: np.ndarray | None) -> None:
        message = self._messages.get(index)
        if message is None or message.parts[entry] is not None:
            return
        rows = 0 if outputs is None else len(outputs)
        part = ENTRY_OUT.pack(sid, status, 0, rows)
        message.parts[entry] = part if outputs is None else part + outputs.tobytes()
        message.left -= 1
        if message.left == 0 and self._order and self._order[0] == index:
            self._flush()

    def _flush(self) -> None:
        """Send every finished message at the head of the order."""
        order = self._order
        while order and self._messages[order[0]].left == 0:
            message = self._messages.pop(order.popleft())
            self._inflight -= 1
            if message.text:
                self.peer.send_text(message.parts[0].decode())
                continue
            head = HEADER.pack(VERSION, KIND_OUTPUTS, 0, message.seq, message.count)
            self.peer.send_bytes(head + b"".join(message.parts))
        self._resume_if(self._inflight <= self.settings.session_queue // 2)
        if not self.paused and not self.peer.can_write:
            self._pause()

    def _control_done(self, handle: Handle, item: Control, value: Any) -> None:
        if item.queued:
            handle.controls -= 1
            self._controls -= 1
        if item.kind == "error":  # a rejected entry (a non-finite one): counted as streams do
            self.rt.error(item.error.code)
            self._entry(item.seq, item.entry, handle.sid,
                        STATUS.get(item.error.code, STATUS["internal"]), None)
            return
        session, sid = handle.session, handle.sid
        if item.kind == "close":  # leave the session resumable, by its token
            handle.session = None
            self.handles.pop(sid)
            samples = session.stream.samples
            self.rt.manager.detach(session, handle)
            reply = {"type": "closed", "sid": sid, "samples": samples, "reason": "close"}
        elif item.kind == "reset":
            reply = {"type": "reset", "sid": sid, "samples": 0}
        elif item.kind == "snapshot":
            samples, arrays = value
            reply = {"type": "snapshot", "sid": sid, "samples": samples,
                     "state": self.rt.manager.blob(session, samples, arrays)}
        else:  # end
            handle.session = None
            self.handles.pop(sid)
            reply = {"type": "end", "sid": sid, "samples": self.rt.manager.end(session)}
        self._answer(item.seq, reply)

    def _control_dropped(self, handle: Handle, item: Control) -> None:
        """A control item the session's queue lost (it ended, closed or was taken over)."""
        if item.kind == "error":  # a rejected entry: answered as it would have been
            self._control_done(handle, item, None)
            return
        if item.queued:
            handle.controls -= 1
            self._controls -= 1
        self.rt.error("unknown_session")
        self._answer(item.seq, {"type": "error", "code": "unknown_session", "sid": handle.sid,
                                "message": "the session left this connection first"})

    def _answer(self, index: int, reply: dict) -> None:
        """A control's reply, into its place in the order."""
        message = self._messages.get(index)
        if message is None:
            return
        message.parts[0], message.left = json.dumps(reply).encode(), 0
        if self._order and self._order[0] == index:
            self._flush()

    def on_writable(self) -> None:
        self._resume_if(self._inflight <= self.settings.session_queue // 2)
