"""The `Peer` interface (server/transport.py) over a plain ASGI WebSocket, for servers other
than uvicorn with `PushProtocol`: a pump task reads messages into the handler and a writer task
sends, in order, what the handler queued."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from server.transport import Handler, payload_of


class AsgiPeer:
    """The `Peer` interface over a plain ASGI WebSocket (any server): one pump task reads
    messages into the handler, one writer task sends what the handler queued, in order."""

    def __init__(self, websocket: Any) -> None:
        self.ws = websocket
        self.handler: Handler | None = None
        self._out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closed = False
        self._writer = asyncio.create_task(self._write())
        self._pump_task: asyncio.Task | None = None

    @property
    def open(self) -> bool:
        return not self._closed

    can_write = True

    def attach(self, handler: Handler) -> None:
        self.handler = handler
        self._pump_task = asyncio.create_task(self._pump())

    async def flushed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer

    async def _pump(self) -> None:
        while True:
            await self._reading.wait()
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self._gone()
                return
            if self.handler is not None and not self._closed:
                self.handler.on_message(payload_of(message))

    async def _write(self) -> None:
        while True:
            kind, payload = await self._out.get()
            try:
                if kind == "bytes":
                    await self.ws.send_bytes(payload)
                elif kind == "text":
                    await self.ws.send_text(payload)
                else:
                    await self.ws.close(code=payload[0], reason=payload[1])
                    self._gone()
                    return
            except Exception:  # the peer is gone
                self._gone()
                return

    def _gone(self) -> None:
        self._closed = True
        for task in (self._writer, self._pump_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self.handler is not None:
            handler, self.handler = self.handler, None
            handler.on_disconnect()

    def send_bytes(self, data: bytes) -> None:
        if not self._closed:
            self._out.put_nowait(("bytes", data))

    def send_text(self, text: str) -> None:
        if not self._closed:
            self._out.put_nowait(("text", text))

    def close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self._out.put_nowait(("close", (code, reason)))

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()
