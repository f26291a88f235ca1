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
    """Replies are held in their packed form (`_ENTRY` header + bytes), so that a checkpoint
    of the ring is one join, however many small replies it holds."""

    def __init__(self, limit: int, count: int = 0, held: list[bytes | str] = ()) -> None:
        self.limit = limit
        self.count = count  # replies sent over the session's life
        self._held: deque[bytes] = deque()  # packed entries
        self._bytes = 0
        for payload in held:
            self._keep(payload)

    def add(self, payload: bytes | str) -> None:
        self.count += 1
        if self.limit:
            self._keep(payload)

    def _keep(self, payload: bytes | str) -> None:
        text = type(payload) is str
        raw = payload.encode() if text else payload
        entry = _ENTRY.pack(text, len(raw)) + raw
        self._held.append(entry)
        self._bytes += len(raw)  # the limit counts the replies' own bytes
        while self._bytes > self.limit and self._held:
            self._bytes -= len(self._held.popleft()) - _ENTRY.size

    def since(self, received: int) -> list[bytes | str] | None:
        """The replies after the first `received`, or None when the ring no longer holds
        them all (or the client claims more than were sent)."""
        missed = self.count - received
        if not 0 <= missed <= len(self._held):
            return None
        return self.unpack(b"".join(list(self._held)[len(self._held) - missed:]))

    def pack(self) -> bytes:
        return b"".join(self._held)

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
