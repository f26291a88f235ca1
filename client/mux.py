"""Many sessions over one connection (WS /v1/models/{name}/mux, format v1).

    async with client.mux("motion") as m:
        a, b = await m.open(), await m.open(sample_rate=20)
        out = await m.send({a: np.zeros((1, 6), np.float32), b: np.zeros((4, 6), np.float32)})
        out[a]                           # (1, d_output) outputs, or a StreamError for that entry
        await m.end(a)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections import deque
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from client import wire
from client.errors import StreamError
from client.wire import STATUS_CODES, WIRE_DTYPES, encode_data


def decode_outputs(data: bytes, d_output: int) -> tuple[int, list[tuple[int, Any]]]:
    """(seq, [(session, outputs array or StreamError), ...]) from an outputs message."""
    try:
        seq, entries = wire.decode_outputs(data, d_output)
    except (ValueError, struct.error) as exc:
        raise StreamError("bad_reply", str(exc)) from None
    return seq, [(sid, values if status == 0 else StreamError(
        STATUS_CODES.get(status, f"status_{status}"), "entry rejected; its session is unchanged"))
        for sid, status, values in entries]


class AsyncMux:
    """One mux connection; sessions are small integers (`sid`) on it."""

    def __init__(self, url: str, model: str, token: str | None = None) -> None:
        self.ws_url = url.replace("http", "ws", 1).rstrip("/") + f"/v1/models/{model}/mux"
        self.token = token
        self.sessions: dict[int, dict] = {}  # sid -> its "opened" message
        self._ws: ClientConnection | None = None
        self._seq = 0
        self._data: deque[tuple[int, asyncio.Future]] = deque()
        self._control: dict[tuple[str, Any], asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._closed_sessions: dict[int, str] = {}

    async def __aenter__(self) -> AsyncMux:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = await connect(self.ws_url, max_size=None, additional_headers=headers)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def open(self, *, dtype: str = "float32", sample_rate: float | None = None,
                   output: str = "every", state: str | None = None,
                   resume: str | None = None) -> int:
        """A new (or resumed) session on this connection; returns its sid."""
        ref = f"r{len(self._control)}-{id(object())}"
        message = {"type": "open", "ref": ref, "dtype": dtype, "output": output}
        for key, value in (("sample_rate", sample_rate), ("state", state), ("resume", resume)):
            if value is not None:
                message[key] = value
        opened = await self._ask(("ref", ref), message)
        self.sessions[opened["sid"]] = opened
        return opened["sid"]

    async def send(self, frames: dict[int, np.ndarray]) -> dict[int, Any]:
        """One data message: each session's frame -> its outputs (or a StreamError)."""
        entries = []
        for sid, frame in frames.items():
            info = self.sessions.get(sid, {"dtype": "float32"})
            payload = np.ascontiguousarray(frame, dtype=WIRE_DTYPES[info["dtype"]])
            entries.append((sid, payload.tobytes(), len(payload)))
        replies = await self.send_raw(entries)
        return dict(replies)

    async def send_raw(self, entries: list[tuple[int, bytes, int]]) -> list[tuple[int, Any]]:
        self._seq += 1
        future = asyncio.get_running_loop().create_future()
        self._data.append((self._seq, future))
        await self._ws.send(encode_data(self._seq, entries))
        return await future

    async def snapshot(self, sid: int) -> tuple[int, str]:
        reply = await self._ask(("snapshot", sid), {"type": "snapshot", "sid": sid})
        return reply["samples"], reply["state"]

    async def reset(self, sid: int) -> None:
        await self._ask(("reset", sid), {"type": "reset", "sid": sid})

    async def end(self, sid: int) -> int:
        reply = await self._ask(("end", sid), {"type": "end", "sid": sid})
        self.sessions.pop(sid, None)
        return reply["samples"]

    async def detach(self, sid: int) -> int:
        """Leave the session resumable (by its token, on a mux or a plain stream)."""
        reply = await self._ask(("closed", sid), {"type": "close", "sid": sid})
        self.sessions.pop(sid, None)
        return reply["samples"]

    async def _ask(self, key: tuple[str, Any], message: dict) -> dict:
        future = asyncio.get_running_loop().create_future()
        self._control[key] = future
        await self._ws.send(json.dumps(message))
        return await future

    async def _read(self) -> None:
        error = StreamError("closed", "the mux connection closed")
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    d_out = next(iter(self.sessions.values()), {}).get("d_output", 1)
                    seq, entries = decode_outputs(message, d_out)
                    expected, future = self._data.popleft()
                    future.set_result(entries) if seq == expected else future.set_exception(
                        StreamError("bad_reply", f"reply {seq} for message {expected}"))
                    continue
                self._on_text(json.loads(message))
        except ConnectionClosed:
            pass
        for _, future in self._data:
            if not future.done():
                future.set_exception(error)
        for future in self._control.values():
            if not future.done():
                future.set_exception(error)

    def _on_text(self, reply: dict) -> None:
        kind = reply.get("type")
        if kind == "opened":
            key = ("ref", reply.get("ref"))
        elif kind == "error":
            if "seq" in reply and self._data:  # a whole data message was unreadable
                _, future = self._data.popleft()
                future.set_exception(StreamError(reply["code"], reply["message"]))
                return
            key = ("ref", reply["ref"]) if "ref" in reply else next(
                (k for k in self._control if k[1] == reply.get("sid")), None)
            future = self._control.pop(key, None)
            if future is not None and not future.done():
                future.set_exception(StreamError(reply["code"], reply["message"]))
            return
        elif kind == "closed" and reply.get("reason") != "close":
            self._closed_sessions[reply["sid"]] = reply["reason"]
            self.sessions.pop(reply["sid"], None)
            return
        else:
            key = (kind, reply.get("sid"))
        future = self._control.pop(key, None)
        if future is not None and not future.done():
            future.set_result(reply)
