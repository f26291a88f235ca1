"""The last replies of a session, so that none is lost around a dropped connection.

A reply the server wrote just before a connection died may never reach the client, although
its frame changed the state. The session counts every reply it sends (frames' outputs and
errors, controls' answers) and keeps the last ones, up to `limit` bytes. A client resuming
with `received` = the replies it got is sent the ones it missed, in order, before anything
else (`started` says how many: `resent`, and the session's count: `replies`). The ring goes
into the session's records with its state, so this holds after a detach, a drain, or a
checkpoint of a killed process.
"""

from __future__ import annotations

import struct
from collections import deque

_ENTRY = struct.Struct("<BI")  # 0 binary / 1 text, length


class ReplyRing:
    def __init__(self, limit: int, count: int = 0, held: list[bytes | str] = ()) -> None:
        self.limit = limit
        self.count = count  # replies sent over the session's life
        self._held: deque[bytes | str] = deque()
        self._bytes = 0
        for payload in held:
            self._keep(payload)

    def add(self, payload: bytes | str) -> None:
        self.count += 1
        if self.limit:
            self._keep(payload)

    def _keep(self, payload: bytes | str) -> None:
        self._held.append(payload)
        self._bytes += len(payload)
        while self._bytes > self.limit and self._held:
            self._bytes -= len(self._held.popleft())

    def since(self, received: int) -> list[bytes | str] | None:
        """The replies after the first `received`, or None when the ring no longer holds
        them all (or the client claims more than were sent)."""
        missed = self.count - received
        if not 0 <= missed <= len(self._held):
            return None
        return list(self._held)[len(self._held) - missed:]

    def pack(self) -> bytes:
        parts = []
        for payload in self._held:
            raw = payload.encode() if isinstance(payload, str) else payload
            parts += [_ENTRY.pack(isinstance(payload, str), len(raw)), raw]
        return b"".join(parts)

    @staticmethod
    def unpack(raw: bytes) -> list[bytes | str]:
        held, at = [], 0
        while at < len(raw):
            text, size = _ENTRY.unpack_from(raw, at)
            at += _ENTRY.size
            data = bytes(raw[at:at + size])
            if len(data) != size:
                raise ValueError("truncated reply ring")
            held.append(data.decode() if text else data)
            at += size
        return held
