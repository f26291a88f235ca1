"""Where sessions wait to be resumed, and where live sessions keep their checkpoints.

`SessionStore` is the interface, `SessionRecord` what it keeps, and `record_parts` /
`unpack_record` the bytes of a record where a store keeps whole records (Redis). The local
directory store (server/local_store.py, the default) keeps them in slab files; Redis
(server/redis_store.py) shares them between replicas.

One owner per session: every token has an epoch in the store, moved on by each `take`. A
record is written under its owner's epoch, and `take` reads only the ones at the current
epoch, so an owner that lost its session writes where nobody reads: it can neither advance the
session in the store nor bring back a stale copy. Each write reads the epoch back after
writing; a changed epoch means the write may not count (False), and the owner lets the session
go. Writes need no lock and no read before the write, which keeps a checkpoint of a thousand
sessions cheap; `take` is the rare, atomic operation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from zlib_ng.zlib_ng import crc32  # the same CRC-32 as zlib's, ~10x faster on state blobs

from server.slabs import crc as slab_crc

# magic, expires_at (local store; 0 in Redis), write sequence, meta, state and ring lengths
_RECORD = struct.Struct("<4sdQIII")
_CRC = struct.Struct("<I")
_MAGIC = b"S4SR"


@dataclass
class SessionRecord:
    """Everything needed to continue a session: its options and a state blob."""

    session_id: str
    model: str
    dtype: str
    sample_rate: float | None
    output: str
    samples: int
    # raw state blob (server/state_blob.py), or its pieces in order: a checkpoint pass hands
    # the store the pieces it cut, which go to the file without being joined first
    state: bytes | tuple[bytes | memoryview, ...]
    live: bool = False  # a checkpoint of a session that was live when it was written
    epoch: int = 0  # set by `take`: the epoch the new owner holds
    replies: int = 0  # replies sent up to this state (server/replies.py)
    ring: bytes = b""  # the last of them, packed (ReplyRing.pack)


@functools.lru_cache(maxsize=1 << 16)
def _meta_head(session_id: str, model: str, dtype: str, sample_rate: float | None,
               output: str) -> bytes:
    # The options that never change in a session's life, as the start of its meta JSON list:
    # rebuilt only for a new session, not for each of its checkpoints.
    return json.dumps([session_id, model, dtype, sample_rate, output],
                      separators=(",", ":"))[:-1].encode() + b","


def meta_bytes(record: SessionRecord) -> bytes:
    """A record's options and counts as a JSON list (the part that changes is formatted on
    its own: a checkpoint pass writes hundreds of records)."""
    return _meta_head(record.session_id, record.model, record.dtype, record.sample_rate,
                      record.output) + b"%d,%s,%d]" % (
        record.samples, b"true" if record.live else b"false", record.replies)


def record_from(meta: bytes, state: bytes, ring: bytes, epoch: int) -> SessionRecord:
    fields = json.loads(meta)
    return SessionRecord(*fields[:6], state, fields[6], epoch, fields[7], ring)


def record_parts(record: SessionRecord, expires_at: float = 0.0, seq: int = 0) -> list:
    """A record as the buffers that make it up, in order (what `pack_record` joins): a fixed
    prefix, the options as JSON, the state blob as it is (no base64 or escaping: a checkpoint
    pass writes hundreds of them at once), the reply ring, a CRC-32 of it all."""
    meta = meta_bytes(record)
    state = record.state if isinstance(record.state, tuple) else (record.state,)
    state_len = sum(len(piece) for piece in state)
    head = _RECORD.pack(_MAGIC, expires_at, seq, len(meta), state_len, len(record.ring))
    crc = crc32(meta, crc32(head))
    for piece in state:
        crc = slab_crc(piece, crc)
    return [head, meta, *state, record.ring, _CRC.pack(slab_crc(record.ring, crc))]


def pack_record(record: SessionRecord, expires_at: float = 0.0, seq: int = 0) -> bytes:
    """The record as one bytes object (see `record_parts`)."""
    return b"".join(record_parts(record, expires_at, seq))


def unpack_record(raw: bytes, epoch: int = 0) -> tuple[SessionRecord, float, int]:
    """(record with `epoch`, expires_at, seq); ValueError when `raw` is not a whole record
    (bytes after it are ignored)."""
    if len(raw) < _RECORD.size:
        raise ValueError("truncated session record")
    magic, expires_at, seq, meta_len, state_len, ring_len = _RECORD.unpack_from(raw)
    state_at = _RECORD.size + meta_len
    end = state_at + state_len + ring_len
    if magic != _MAGIC or len(raw) < end + _CRC.size:
        raise ValueError("not a whole session record")
    view = memoryview(raw)
    if slab_crc(view[:end]) != _CRC.unpack_from(raw, end)[0]:
        raise ValueError("session record fails its checksum (cut short by a crash)")
    record = record_from(bytes(view[_RECORD.size:state_at]),
                         bytes(view[state_at:state_at + state_len]),
                         bytes(view[state_at + state_len:end]), epoch)
    return record, expires_at, seq


@functools.lru_cache(maxsize=1 << 16)  # a live session's token is hashed on each checkpoint
def token_hash(token: str) -> str:
    # Tokens are client-supplied: hashed, they can never name another path or key.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class RowBatch:
    """Checkpoints of a slice of live sessions, their state blobs cut from rows of arrays
    (server/state_blob.py `BlobWriter.blob_rows`): session i's blob is heads[i], then row i of
    each of `parts` (uint8, (B, n)), then tails[i]. The records in `items` carry no state."""

    items: list[tuple[str, SessionRecord, int]]
    heads: list[bytes]
    parts: list[np.ndarray]
    tails: list[bytes]

    def item(self, i: int) -> tuple[str, SessionRecord, int]:
        """The (token, whole record, epoch) of session i."""
        token, record, epoch = self.items[i]
        state = (self.heads[i], *(memoryview(part[i]) for part in self.parts), self.tails[i])
        return token, SessionRecord(**{**record.__dict__, "state": state}), epoch


class SessionStore(ABC):
    @abstractmethod
    def put_many(self, items: list[tuple[str, SessionRecord, int]], ttl: float) -> list[bool]:
        """Keep each (token, record, epoch) for `ttl` seconds, replacing any older record;
        False where the session was taken since its owner got `epoch` (the write may not
        count: that owner must let the session go)."""

    def put(self, token: str, record: SessionRecord, ttl: float, epoch: int = 0) -> bool:
        return self.put_many([(token, record, epoch)], ttl)[0]

    def put_rows(self, batch: RowBatch, ttl: float) -> list[bool]:
        """`put_many` of a checkpoint slice (a store may copy the rows in without cutting
        a record for each)."""
        return self.put_many([batch.item(i) for i in range(len(batch.items))], ttl)

    @abstractmethod
    def take(self, token: str) -> SessionRecord | None:
        """Remove and return the record (its `epoch` is the new owner's), or None when
        unknown or expired. Atomic: of two concurrent callers at most one gets it."""

    @abstractmethod
    def forget(self, token: str, epoch: int) -> None:
        """The session ended: drop its record (one written at a later epoch stays)."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Drop expired records and those of epochs gone by; returns how many."""
