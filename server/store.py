"""Where sessions wait to be resumed, and where live sessions keep their checkpoints.

`SessionStore` is the interface; `LocalDirectoryStore` keeps one small file per session (the
default, survives a restart or a SIGKILL of this process). A shared store (Redis) implements
the same methods so that a session can resume on another replica.

One owner per session: every token has an epoch in the store, moved on by each `take`. A
record is written under its owner's epoch (`<token hash>-<epoch>`), and `take` reads only the
ones at the current epoch, so an owner that lost its session writes where nobody reads: it can
neither advance the session in the store nor bring back a stale copy. Each write reads the
epoch back after writing; a changed epoch means the write may not count (False), and the owner
lets the session go. Writes need no lock and no read before the write, which keeps a
checkpoint of a thousand sessions cheap; `take` is the rare, locked operation.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import struct
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zlib_ng.zlib_ng import crc32  # the same CRC-32 as zlib's, ~10x faster on state blobs

from server.mapped_files import MappedFiles

_EPOCH_KEEP = 3600.0  # seconds an epoch outlives its records (each write refreshes it)
# magic, expires_at (local store; 0 in Redis), write sequence, meta, state and ring lengths
_RECORD = struct.Struct("<4sdQIII")
_CRC = struct.Struct("<I")
_TAKES = struct.Struct("<Q")
_CRC_PIECE = 4096
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


def _crc(data, crc: int = 0) -> int:
    """CRC-32 of `data` in pieces under 5 KiB: zlib(-ng) releases the GIL for a longer buffer,
    and the writer thread would then wait for the busy event loop to hand it back, once per
    record (measured: 50 checksums of 13 KB, 43 ms of wall time beside a busy thread; in 4 KB
    pieces, 0.2 ms)."""
    view = memoryview(data).cast("B")
    for at in range(0, len(view), _CRC_PIECE):
        crc = crc32(view[at:at + _CRC_PIECE], crc)
    return crc


def record_parts(record: SessionRecord, expires_at: float = 0.0, seq: int = 0) -> list:
    """A record as the buffers that make it up, in order (what `pack_record` joins): a fixed
    prefix, the options as JSON, the state blob as it is (no base64 or escaping: a checkpoint
    pass writes hundreds of them at once), the reply ring, a CRC-32 of it all."""
    meta = _meta_head(record.session_id, record.model, record.dtype, record.sample_rate,
                      record.output) + b"%d,%s,%d]" % (
        record.samples, b"true" if record.live else b"false", record.replies)
    state = record.state if isinstance(record.state, tuple) else (record.state,)
    state_len = sum(len(piece) for piece in state)
    head = _RECORD.pack(_MAGIC, expires_at, seq, len(meta), state_len, len(record.ring))
    crc = crc32(meta, crc32(head))
    for piece in state:
        crc = _crc(piece, crc)
    return [head, meta, *state, record.ring, _CRC.pack(_crc(record.ring, crc))]


def pack_record(record: SessionRecord, expires_at: float = 0.0, seq: int = 0) -> bytes:
    """The record as one bytes object (see `record_parts`)."""
    return b"".join(record_parts(record, expires_at, seq))


def unpack_record(raw: bytes, epoch: int = 0) -> tuple[SessionRecord, float, int]:
    """(record with `epoch`, expires_at, seq); ValueError when `raw` is not a whole record
    (bytes after it are ignored: the local store overwrites files in place)."""
    if len(raw) < _RECORD.size:
        raise ValueError("truncated session record")
    magic, expires_at, seq, meta_len, state_len, ring_len = _RECORD.unpack_from(raw)
    state_at = _RECORD.size + meta_len
    end = state_at + state_len + ring_len
    if magic != _MAGIC or len(raw) < end + _CRC.size:
        raise ValueError("not a whole session record")
    view = memoryview(raw)
    if _crc(view[:end]) != _CRC.unpack_from(raw, end)[0]:
        raise ValueError("session record fails its checksum (cut short by a crash)")
    meta = json.loads(bytes(view[_RECORD.size:state_at]))
    state = bytes(view[state_at:state_at + state_len])
    ring = bytes(view[state_at + state_len:end])
    return SessionRecord(*meta[:6], state, meta[6], epoch, meta[7], ring), expires_at, seq


@functools.lru_cache(maxsize=1 << 16)  # a live session's token is hashed on each checkpoint
def token_hash(token: str) -> str:
    # Tokens are client-supplied: hashed, they can never name another path or key.
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore(ABC):
    @abstractmethod
    def put_many(self, items: list[tuple[str, SessionRecord, int]], ttl: float) -> list[bool]:
        """Keep each (token, record, epoch) for `ttl` seconds, replacing any older record;
        False where the session was taken since its owner got `epoch` (the write may not
        count: that owner must let the session go)."""

    def put(self, token: str, record: SessionRecord, ttl: float, epoch: int = 0) -> bool:
        return self.put_many([(token, record, epoch)], ttl)[0]

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


class LocalDirectoryStore(SessionStore):
    """Two files `<hash>-<epoch>.0.rec` and `.1.rec` per token and epoch, written in turn and
    in place through a memory map (server/mapped_files.py: no system call per write, no
    rename: replacing a file is ~10x dearer on ext4), and `<hash>.epoch`. Each record carries
    a write sequence and a CRC, so a write cut short by a SIGKILL, or read while it lands,
    fails its check and the other file (the previous record, whole) is used. `take` holds
    the directory's lock (flock on `.lock`) so that the workers of one server sharing the
    directory agree on who took a session.

    A write is checked against the epoch file of its session only when some take has moved
    an epoch since that session was last checked: every take counts itself in `.takes` before
    and after it moves an epoch, and a write that reads the count unchanged since its
    session's check cannot have been overtaken (one read per pass instead of one per
    session, most of them of files that do not exist)."""

    def __init__(self, directory: Path, clock=time.time) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._root = str(self.directory)
        self._clock = clock
        self._seq = time.time_ns()
        self._turn: dict[str, int] = {}  # which of a record's two files is written next
        self._checked: dict[str, int] = {}  # the take count when a record's epoch was read
        self._files = MappedFiles()

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._path(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _epoch(self, digest: str) -> int:
        # os-level calls: read after each checkpoint write, mostly of files that do not exist
        # (a session never taken is at epoch 0), where io.open costs twice as much
        try:
            fd = os.open(self._path(digest + ".epoch"), os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            return int(os.read(fd, 32))
        except ValueError:
            return 0
        finally:
            os.close(fd)

    @staticmethod
    def _count(fd: int) -> int | None:
        raw = os.pread(fd, _TAKES.size, 0)
        return _TAKES.unpack(raw)[0] if len(raw) == _TAKES.size else None

    def _takes(self) -> int | None:
        """The take count (None: unreadable, so every write is checked)."""
        try:
            fd = os.open(self._path(".takes"), os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            return self._count(fd)
        finally:
            os.close(fd)

    def _count_take(self) -> None:
        """Under the lock. Never back to a count seen before, even if the file was lost."""
        fd = os.open(self._path(".takes"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, _TAKES.pack(max((self._count(fd) or 0) + 1, time.time_ns())), 0)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _moving_epoch(self) -> Iterator[None]:
        """Under the lock, around a change of an epoch file: counted before and after, so a
        write that reads the count unchanged was not overtaken by it."""
        self._count_take()
        yield
        self._count_take()

    def _unmap(self, name: str) -> None:
        for turn in (0, 1):
            self._files.drop(self._path(f"{name}.{turn}.rec"))

    def _let_go(self, name: str) -> None:
        """What this process keeps for the record `name`: its turn, its check, its mappings."""
        self._turn.pop(name, None)
        self._checked.pop(name, None)
        self._unmap(name)

    def put_many(self, items: list[tuple[str, SessionRecord, int]], ttl: float) -> list[bool]:
        expires_at = self._clock() + ttl
        written = []
        for token, record, epoch in items:
            name = f"{token_hash(token)}-{epoch}"
            turn = self._turn.get(name, 0)
            self._turn[name] = 1 - turn
            self._seq = max(self._seq + 1, time.time_ns())
            self._files.write(self._path(f"{name}.{turn}.rec"),  # a copy into its mapping
                              record_parts(record, expires_at, self._seq))
            written.append((name, epoch))
        # read back after the write: a take that has not moved the epoch on yet reads this
        # record (or a later one), so the write counts. The count is read before any epoch,
        # so a take that moves one after it has counted itself after it too.
        takes, results = self._takes(), []
        for name, epoch in written:
            if takes is not None and self._checked.get(name) == takes:
                results.append(True)
                continue
            digest = name.rpartition("-")[0]
            ok = self._epoch(digest) == epoch
            if ok:
                if takes is not None:
                    self._checked[name] = takes
                if epoch:
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(self._path(digest + ".epoch"))  # purge keeps a used epoch
            else:
                self._let_go(name)
            results.append(ok)
        return results

    def _read(self, name: str) -> tuple[SessionRecord, float, int] | None:
        """The newer whole record of the two files `name`.{0,1}.rec."""
        best = None
        for turn in (0, 1):
            try:
                with open(self._path(f"{name}.{turn}.rec"), "rb") as f:
                    got = unpack_record(f.read())
            except (OSError, ValueError):
                continue
            if best is None or got[2] > best[2]:
                best = got
        return best

    def _expired(self, path: Path, now: float) -> bool:
        try:
            with open(path, "rb") as f:
                head = f.read(_RECORD.size)
            if len(head) < _RECORD.size:  # cut short: gone once old enough to be nobody's
                return path.stat().st_mtime < time.time() - _EPOCH_KEEP
        except OSError:  # removed meanwhile
            return True
        return _RECORD.unpack(head)[1] < now

    def put(self, token: str, record: SessionRecord, ttl: float, epoch: int = 0) -> bool:
        """A record this process hands over (a detach, a drain): its mappings are let go."""
        ok = self.put_many([(token, record, epoch)], ttl)[0]
        self._unmap(f"{token_hash(token)}-{epoch}")
        return ok

    def take(self, token: str) -> SessionRecord | None:
        digest = token_hash(token)
        with self._locked():
            epoch = self._epoch(digest)
            name = f"{digest}-{epoch}"
            files = [self._path(f"{name}.{turn}.rec") for turn in (0, 1)]
            if not any(os.path.exists(path) for path in files):
                return None
            # the epoch moves on before the record is read: a write that lands before the
            # read is taken with it, a later one is never read (and its writer is told)
            tmp = self._path(f".{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(str(epoch + 1).encode())
            with self._moving_epoch():
                os.replace(tmp, self._path(digest + ".epoch"))
            got = self._read(name)
            for path in files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._let_go(name)
        if got is None or got[1] < self._clock():
            return None
        got[0].epoch = epoch + 1
        return got[0]

    def forget(self, token: str, epoch: int) -> None:
        name = f"{token_hash(token)}-{epoch}"
        self._let_go(name)
        for turn in (0, 1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(f"{name}.{turn}.rec"))

    def purge_expired(self) -> int:
        """Records past their time or of an epoch gone by; returns how many sessions."""
        now, names = self._clock(), {}
        for path in self.directory.glob("*.rec"):
            names.setdefault(path.name.rsplit(".", 2)[0], []).append(path)
        gone = set()
        for name, paths in names.items():
            digest, _, epoch = name.rpartition("-")
            # a live owner always has one file written within resume_ttl / 2, and its mapping
            # would go on writing a deleted file: a name goes only when all of it expired
            if int(epoch) == self._epoch(digest) and not all(
                    self._expired(path, now) for path in paths):
                continue
            self._let_go(name)
            for path in paths:
                path.unlink(missing_ok=True)
            gone.add(name)
        # the epoch of a session taken long ago and not written since (ended, or idle); counted
        # like a take, since a writer at that epoch must now be told it lost the session
        for path in self.directory.glob("*.epoch"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < time.time() - _EPOCH_KEEP and not any(
                        self.directory.glob(f"{path.stem}-*.rec")):
                    with self._locked(), self._moving_epoch():
                        path.unlink()
        for path in self.directory.glob(".*.tmp"):  # left by a process killed mid-write
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < time.time() - 60:
                    path.unlink()
        return len(gone)
