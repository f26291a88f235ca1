"""WebSocket transport for streams: messages pushed to a handler, replies written without a task.

uvicorn's sans-I/O WebSocket protocol hands every message to the app through an asyncio queue
and pauses reading until the app's task has taken it: a task wake-up per message, and a client
whose replies back up stops being read, pongs included. `PushProtocol` keeps uvicorn's parser,
handshake, keepalive and close handling, and adds an ASGI extension, `s4serve.push`: once the
app has accepted the connection it attaches a `Handler`, which from then on gets each message
as a plain call from `data_received` and writes replies synchronously (during a round of a tick,
held to its end and written once per connection: server/cork.py). Reading pauses only when
the handler asks (its own flow control), so pings and pongs keep flowing otherwise, and while
it is paused a missing pong does not close the connection.

`server.asgi_peer.AsgiPeer` gives the same interface over any ASGI server (a pump task and a
writer task), so the app also runs where `PushProtocol` is not installed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.speedups import apply_mask
from websockets.streams import StreamReader

from client.wire import ws_header, ws_length
from server.cork import CORK

EXTENSION = "s4serve.push"


def payload_of(message: dict) -> bytes | str:
    """An ASGI websocket.receive's data; an empty binary message stays binary (b"")."""
    data = message.get("bytes")
    return data if data is not None else message.get("text") or ""


class Handler(Protocol):
    """What a transport calls; every method runs on the event loop and must not block. A
    handler may also have `express(payload: bytes) -> bool`: offered each binary message that
    arrives alone in one read, before anything else is done with it; False (having changed
    nothing) sends it the usual way, to `on_message`."""

    def on_message(self, data: bytes | str) -> None: ...

    def on_writable(self) -> None: ...

    def on_disconnect(self) -> None: ...


class Peer(Protocol):
    """What a handler calls to answer its client."""

    @property
    def open(self) -> bool: ...

    @property
    def can_write(self) -> bool:
        """False while the socket's write buffer is over its high-water mark."""
        ...

    def attach(self, handler: Handler) -> None: ...

    def send_bytes(self, data: bytes) -> None: ...

    def send_text(self, text: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    async def flushed(self) -> None:
        """Return once everything sent so far has been handed to the server."""
        ...


# where websockets' parser waits between frames (websockets.protocol.Protocol.parse)
_BETWEEN_FRAMES = StreamReader.at_eof.__code__


class PushProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with the `s4serve.push` extension.

    Once a handler is attached, complete final text and binary frames are parsed here (header,
    unmask, deliver: a few lines per frame) instead of by websockets' generator-based parser,
    which built a Frame object through several generators per message: 12% of a worker's time
    at 100 per-sample sessions (py-spy). Control frames still go through websockets and
    uvicorn, and anything unusual hands the connection back to them for good."""

    handler: Handler | None = None
    _peer_paused = False
    _fast = False  # parsing here: websockets' parser was left at a frame boundary
    _slow = False  # never again (an unusual frame was seen)
    _rest = b""  # received bytes not parsed yet (a frame's start, or held while paused)
    _data_at = 0.0  # loop time of the last read from the peer
    _held: list[bytes] | None = None  # frames written during a round (server/cork.py)
    _resume_due = False  # reading resumes once the round that asked for it is over
    _express: Callable[[bytes], bool] | None = None  # the handler's, if it has one

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One read can hold thousands of small messages; while the handler has paused, the
        # rest wait here (bounded by the read size) instead of being delivered.
        self._backlog: deque[Request | Frame] = deque()
        self._by_opcode = {
            Opcode.CONT: self.handle_cont, Opcode.TEXT: self.handle_text,
            Opcode.BINARY: self.handle_bytes, Opcode.PONG: self.handle_pong,
            Opcode.CLOSE: self.handle_close,
        }

    # ----- the fast path: simple data frames parsed here ---------------------------------
    def data_received(self, data: bytes) -> None:
        self._data_at = self.loop.time()
        if self._express is not None and self._fast and not self._rest and self._one(data):
            return
        if not self._fast:
            if self.handler is None or self._slow or not self._at_boundary():
                return super().data_received(data)
            self._fast = True
        if self._rest:
            data = self._rest + data
            self._rest = b""
        self._parse(data)

    def _one(self, data: bytes) -> bool:
        """`data` is one whole final binary frame, masked, without extension bits and within
        the size limit, and the handler's `express` took its payload."""
        if len(data) < 6 or data[0] != 0x82 or self._peer_paused or self.close_sent:
            return False
        size, head = data[1] & 0x7F, 2
        if size == 126:
            size, head = (data[2] << 8) | data[3], 4
        limit = self.conn.max_message_size
        if (data[1] & 0x80 == 0 or size == 127 or head + 4 + size != len(data)
                or (limit is not None and size > limit)):
            return False
        return self._express(apply_mask(data[head + 4:], data[head:head + 4]))

    def _at_boundary(self) -> bool:
        """websockets' parser holds no part of a frame: it waits between frames with nothing
        buffered (so the next byte received starts a frame)."""
        conn = self.conn
        try:
            if conn.extensions or conn.reader.buffer or conn.current_size is not None:
                return False
            gen = conn.parser
            while gen.gi_yieldfrom is not None:
                gen = gen.gi_yieldfrom
            return gen.gi_code is _BETWEEN_FRAMES
        except AttributeError:  # another websockets: stay with its parser
            return False

    def _parse(self, buf: bytes) -> None:
        """Unmask and deliver every complete final text/binary frame of `buf`; a control frame
        goes through websockets' parser on its own (uvicorn's handling of ping, pong and
        close), anything else (fragments, reserved bits, unmasked or oversized frames) hands
        this and every later read to it for good. What cannot be delivered yet (the handler
        paused, or a frame not complete) waits in `_rest`."""
        at, end, limit = 0, len(buf), self.conn.max_message_size
        while not self._peer_paused and self.handler is not None:
            span = ws_length(buf, at)
            if span is None:
                break
            (size, head), b0, b1 = span, buf[at], buf[at + 1]
            opcode = b0 & 0x0F
            if not (b1 & 0x80 and (b0 & 0xF0) == 0x80) or (
                    opcode not in (1, 2) and not (8 <= opcode <= 10 and size <= 125)) or (
                    limit is not None and size > limit):
                self._fast, self._slow = False, True  # websockets checks it, closes as it must
                super().data_received(buf[at:])
                return
            stop = head + 4 + size
            if stop > end:
                break
            start, at = at, stop
            if opcode >= 8:  # ping, pong, close: websockets' parser, then uvicorn's handlers
                super().data_received(buf[start:stop])
            elif not self._deliver(apply_mask(buf[head + 4:stop], buf[head:head + 4]),
                                   opcode == 1):
                return
        if at < end:
            self._rest = buf[at:]

    # ----- uvicorn hooks ---------------------------------------------------------------
    def handle_events(self) -> None:
        self._backlog.extend(self.conn.events_received())
        self._deliver_backlog()

    def _deliver_backlog(self) -> None:
        backlog = self._backlog
        while backlog and not (self._peer_paused and self.handler is not None):
            event = backlog.popleft()
            if isinstance(event, Request):
                self.handle_connect(event)
            elif event.opcode is Opcode.PING:
                self.handle_ping()
            else:
                self._by_opcode[event.opcode](event)

    def handle_connect(self, event) -> None:
        super().handle_connect(event)
        if hasattr(self, "scope"):  # the handshake went ahead: offer the extension
            self.scope["extensions"][EXTENSION] = {"peer": self}

    def send_receive_event_to_app(self) -> None:
        if self.handler is None:
            return super().send_receive_event_to_app()
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        self._deliver(data, self.curr_msg_data_type == "text")

    def _deliver(self, data: bytes, text: bool) -> bool:
        """A whole message to the handler (dropped once our close is sent); False when a
        text message is not UTF-8 and the connection closes 1007."""
        if self.close_sent:
            return True
        if text:
            try:
                data = data.decode()
            except UnicodeDecodeError:
                self.conn.send_close(1007, "invalid UTF-8")
                self.handle_parser_exception()
                return False
        self.handler.on_message(data)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._express = None
        if self.handler is not None:
            handler, self.handler = self.handler, None
            handler.on_disconnect()

    def keepalive_timeout(self) -> None:
        """No pong in time: the client is gone, unless reading is paused by our own flow
        control or bytes came from it since the ping (a client whose frames wait for
        compute is healthy, and its pong waits unread behind them): then ping again later
        instead of closing it 1011."""
        alive = self.read_paused or self._data_at > self.ping_sent_at
        if alive and not self.close_sent:
            self.pong_timer = None
            self.pending_ping_payload = None
            self.schedule_ping()
            return
        super().keepalive_timeout()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.handler is not None:
            self.handler.on_writable()

    # ----- Peer ------------------------------------------------------------------------
    @property
    def open(self) -> bool:
        return not (self.close_sent or self.disconnected) and self.conn.state is State.OPEN

    @property
    def can_write(self) -> bool:
        return self.writable.is_set()  # uvicorn's event, cleared by pause_writing

    def attach(self, handler: Handler) -> None:
        """Deliver every later message to `handler`; messages queued for the app go first."""
        self.handler, self._express = handler, getattr(handler, "express", None)
        while not self.queue.empty():
            message = self.queue.get_nowait()
            if message["type"] == "websocket.disconnect":
                self.handler = self._express = None
                handler.on_disconnect()
                return
            handler.on_message(payload_of(message))
        if self.read_paused and not self._peer_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def send_bytes(self, data: bytes) -> None:
        if not self.open:
            return
        if self.conn.extensions:  # e.g. permessage-deflate: let websockets frame it
            self.conn.send_binary(data)
            self._write(b"".join(self.conn.data_to_send()))
        else:  # the common case, framed here: a header and the payload
            self._write(ws_header(2, len(data)) + data)

    def send_text(self, text: str) -> None:
        if not self.open:
            return
        data = text.encode()
        if self.conn.extensions:
            self.conn.send_text(data)
            self._write(b"".join(self.conn.data_to_send()))
        else:  # framed here, as binary replies are (error replies past capacity are many)
            self._write(ws_header(1, len(data)) + data)

    def _write(self, data: bytes) -> None:
        """Now, or held to the end of the round that runs (one write per round)."""
        if not CORK.active:
            self.transport.write(data)
        elif self._held is None:
            self._held = [data]
            CORK.hold(self)
        else:
            self._held.append(data)

    def release(self, closing: bool = False) -> None:
        """Write the held frames: dropped if the connection closed meanwhile (a close frame
        must be the last one sent), written before our close reply when the client's close
        is being answered (`closing`)."""
        held, self._held = self._held, None
        if held and (self.open or (closing and not (self.close_sent or self.disconnected))):
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def handle_close(self, event: Frame) -> None:
        self.release(closing=True)  # the replies held in this round go before our close reply
        super().handle_close(event)

    def close(self, code: int, reason: str) -> None:
        if self.close_sent or self.disconnected:
            return
        self.release()  # the replies written before the close go before it
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True  # later messages are dropped; the peer's close reply ends it
        self.resume_reading()  # read on, to the peer's close reply (data is dropped)
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    async def flushed(self) -> None:
        return  # every send was written to the transport synchronously, or at its round's end

    def pause_reading(self) -> None:
        self._peer_paused = True
        self._resume_due = False  # a resume asked for earlier in this round is void
        if not self.read_paused and not self.disconnected:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if CORK.active:  # not in the middle of a round (server/cork.py): at its end
            if not self._resume_due:
                self._resume_due = True
                CORK.later(self._resume_after_round)
            return
        self._peer_paused = False
        self._deliver_backlog()
        if self._rest and self._fast and not self._peer_paused:
            rest, self._rest = self._rest, b""
            self._parse(rest)
        if self._peer_paused:  # the backlog filled the handler's queue again
            return
        if self.read_paused and not self.disconnected:
            self.read_paused = False
            self.transport.resume_reading()

    def _resume_after_round(self) -> None:
        if self._resume_due:
            self._resume_due = False
            self.resume_reading()
