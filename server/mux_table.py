"""A mux connection's sessions (handles) by id, the routes of its fast path, and its
messages in flight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from client import wire
from client.wire import ENTRY_IN, ENTRY_OUT, HEADER, STATUS, WIRE_DTYPES
from server.errors import CLOSE_GOING_AWAY
from server.work import BATCH_FAILED, BATCH_GONE, BATCH_NON_FINITE, BATCH_OK, Control, Frame

# what a batch member's outcome is answered with
_BATCH_CODES = {BATCH_GONE: "unknown_session", BATCH_NON_FINITE: "non_finite",
                BATCH_FAILED: "internal"}

if TYPE_CHECKING:
    from server.sessions import Session

# routes kept per connection (a gateway that sends ever other subsets of its sessions)
MAX_ROUTES = 64


@dataclass(eq=False)
class Message:
    """A data message of a connection, until its reply is sent (in order)."""

    seq: int  # the client's number for it, echoed in the reply
    parts: list[bytes | None]  # one per entry, or the whole body (fast path), or an error text
    left: int  # entries not answered yet
    count: int  # entries in the reply
    text: bool = False  # parts[0] is a JSON error for the whole message
    sids: np.ndarray | None = None  # fast path: the entries' sessions, in order


@dataclass(eq=False)
class Handle:
    """One session on this connection; the scheduler's sink and the session's owner."""

    conn: Any  # the MuxConnection (server/mux_api.py)
    sid: int
    session: Session | None = None
    ref: Any = None
    controls: int = 0  # control items of this session on its queue

    def frame_done(self, frame: Frame, outputs: np.ndarray) -> None:
        self.conn._entry(frame.seq, frame.entry, self.sid, 0, outputs)

    def frames_done(self, frames: list[Frame], outputs: np.ndarray) -> None:
        for frame, out in zip(frames, outputs, strict=True):
            self.conn._entry(frame.seq, frame.entry, self.sid, 0, out[None])

    def frame_failed(self, frame: Frame, exc: Exception) -> None:
        self.conn._entry(frame.seq, frame.entry, self.sid, STATUS["internal"], None)

    def control_done(self, item: Control, value: Any) -> None:
        self.conn._control_done(self, item, value)

    def work_dropped(self, items: list[Frame | Control]) -> None:
        """Entries and control items that will not be applied here (the session ended, was
        closed or taken over): answered `unknown_session`, so every reply slot is filled."""
        for item in items:
            if type(item) is Control:
                self.conn._control_dropped(self, item)
            else:
                self.conn._entry(item.seq, item.entry, self.sid, STATUS["unknown_session"],
                                 None)

    def kick(self, code: int, reason: str) -> None:
        """Taken over elsewhere: this session leaves the connection (told with `closed`).
        Shutting down: the whole connection closes, every session resumable."""
        if code == CLOSE_GOING_AWAY:
            self.conn.kick(code, reason)
            return
        if self.session is not None:
            self.conn.rt.manager.detach(self.session, self)  # no-op once taken over
        self.conn._drop(self, reason)


@dataclass(eq=False, slots=True)
class Route:
    """The streams of one list of session ids, worked out once."""

    streams: list  # distinct float32 streams owned by this connection, in list order
    rate: float
    rows: np.ndarray  # their slots (int64): used only where rows never move (in-place pools)
    drops: int  # the scheduler's drop count then: while it stands, the streams are as they were
    # in-place pools: a reply's records for these ids (ok, one row each), the step prepared to
    # write their outputs there, and its per-row flags (mux_api fills them on first use)
    reply: np.ndarray | None = None
    call: Any = None  # checks that a message's records are for these ids, one sample each
    kept: np.ndarray | None = None
    size: int = 0  # bytes of a data message of these ids, one float32 sample each
    count: bytes = b""  # its header's entry count, as sent (little-endian uint32)

    def prepare(self, pool: Any, sids: np.ndarray, d_input: int, d_output: int) -> None:
        """The reply's records, the flags and the step call of these ids, on first use (a
        gateway sends the same ids every tick)."""
        if self.call is None:
            self.reply = ok_records(sids, d_output)
            self.kept = np.empty(len(sids), np.uint8)
            keys = np.stack([sids, np.ones_like(sids)], axis=1).astype(np.uint32)
            self.call = pool.backend.rows_call(pool.flat32, pool.flat64, self.rows, self.rate,
                                               self.reply["y"][:, 0], self.kept, keys,
                                               pool.steps)
            self.size = HEADER.size + len(sids) * (ENTRY_IN.size + 4 * d_input)
            self.count = len(sids).to_bytes(4, "little")


class HandleTable:
    """The handles of one connection's sessions by id. A route, the streams of a data
    message's list of ids and their rate, is worked out once per list and kept while the
    table is unchanged: a gateway sends the same list every tick."""

    def __init__(self) -> None:
        self._by_sid: dict[int, Any] = {}
        self._routes: dict[bytes, Route] = {}
        self.last: Route | None = None  # the route of the last message stepped at once

    def __len__(self) -> int:
        return len(self._by_sid)

    def get(self, sid: Any) -> Any:
        return self._by_sid.get(sid)

    def values(self) -> list:
        return list(self._by_sid.values())

    def add(self, handle: Any) -> None:
        self._by_sid[handle.sid] = handle
        self._routes.clear()
        self.last = None

    def pop(self, sid: int) -> Any:
        handle = self._by_sid.pop(sid, None)
        self._routes.clear()
        self.last = None
        return handle

    def clear(self) -> None:
        self._by_sid.clear()
        self._routes.clear()
        self.last = None

    def route(self, sids: np.ndarray, drops: int) -> Route | None:
        """The route of `sids` when they are distinct float32 sessions of one rate, owned
        here; else None. `drops`: the scheduler's drop count now (a stream dropped since a
        route was worked out may have left, or moved to another epoch)."""
        key = sids.tobytes()
        route = self._routes.get(key)
        if route is None or route.drops != drops:
            route = self._work_out(sids.tolist(), drops)
            if route is None:
                return None
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _work_out(self, sids: list[int], drops: int) -> Route | None:
        streams, rate = [], None
        for sid in sids:
            handle = self._by_sid.get(sid)
            session = handle.session if handle is not None else None
            if session is None or session.dtype != "float32" or session.stream.sink is not handle:
                return None
            stream = session.stream
            if rate is None:
                rate = stream.rate
            elif stream.rate != rate:
                return None
            streams.append(stream)
        if len(set(map(id, streams))) != len(streams):
            return None
        rows = np.fromiter((s.slot for s in streams), np.int64, len(streams))
        return Route(streams, rate, rows, drops)


def read_entries(handles: HandleTable, data: bytes, count: int,
                 d_input: int) -> tuple[list[tuple], tuple[int, int, int] | None, int]:
    """The entries of a data message: (entry, handle, payload, samples) each, while they can
    be located; then (first entry not read, its status, its sid) when the reading stopped
    early (the message ends in an entry header: bad_shape; an unknown session, whose samples'
    size is unknown: the rest is unreadable), else None; and where the entries ended (past
    the message's end when the last payload is cut short)."""
    at, read = HEADER.size, []
    for entry in range(count):
        if at + ENTRY_IN.size > len(data):
            return read, (entry, STATUS["bad_shape"], 0), at
        sid, samples = ENTRY_IN.unpack_from(data, at)
        at += ENTRY_IN.size
        handle = handles.get(sid)
        if handle is None or handle.session is None:
            return read, (entry, STATUS["unknown_session"], sid), at
        size = samples * d_input * WIRE_DTYPES[handle.session.dtype].itemsize
        read.append((entry, handle, data[at:at + size], samples))
        at += size
    return read, None, at


def ok_records(sids: np.ndarray, d_output: int) -> np.ndarray:
    """A reply's records for `sids`, each ok with one row (outputs not filled in)."""
    body = np.empty(len(sids), wire.uniform_outputs(1, d_output))
    body["sid"], body["status"], body["res"], body["rows"] = sids, 0, 0, 1
    return body


def reply_body(sids: np.ndarray, outputs: np.ndarray, status: np.ndarray,
               count_error: Callable[[str], None]) -> bytes:
    """The entries of a batch's reply, in order: outputs (B, d_output), status (B,) BATCH_*."""
    if not status.any():  # every entry ok: the reply body is one structured array
        body = ok_records(sids, outputs.shape[1])
        body["y"] = outputs[:, None]
        return body.tobytes()
    parts = []
    for sid, outcome, row in zip(sids.tolist(), status.tolist(), outputs, strict=True):
        if outcome == BATCH_OK:
            parts.append(ENTRY_OUT.pack(sid, STATUS["ok"], 0, 1) + row.tobytes())
            continue
        code = _BATCH_CODES[outcome]
        count_error(code)
        parts.append(ENTRY_OUT.pack(sid, STATUS[code], 0, 0))
    return b"".join(parts)
