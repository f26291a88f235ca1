"""The local directory store (the default): records in slab files (server/slabs.py), one epoch
file per session taken at least once, shared by the workers of one server, and kept across a
restart or a SIGKILL of any of them.

A session owns a pair of halves in a slab file of this process and writes them in turn; each
half says whose record it is (token digest and epoch), so a take from any process finds it
by scanning the directory's slabs (a few hundred files at most, each mapped once). `take`
holds the directory's lock (flock on `.lock`) so that the workers sharing the directory agree
on who took a session, moves the epoch on, reads the newer whole half at the old epoch and
clears both.

A write is checked against the epoch file of its session only when some take has moved an
epoch since that session was last checked: every take counts itself in `.takes` before and
after it moves an epoch, and a write that reads the count unchanged since its session's check
cannot have been overtaken (one read per pass instead of one per session, most of them of
files that do not exist).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from server.slabs import BODY_AT, HEAD, Slab, SlabFiles, commit, parse
from server.store import (
    RowBatch,
    SessionRecord,
    SessionStore,
    meta_bytes,
    record_from,
    token_hash,
)

_EPOCH_KEEP = 3600.0  # seconds an epoch outlives its records (each write refreshes it)
_TAKES = struct.Struct("<Q")


def _run(indices: list[int], step: int) -> slice | list[int]:
    """`indices` as a slice when they are evenly spaced by `step` (sessions checkpointed
    together took neighbouring pairs and write the same turn): copied through views, with
    no gathered copy in between."""
    first, last = indices[0], indices[-1]
    if last - first == step * (len(indices) - 1) and indices == list(
            range(first, last + 1, step)):
        return slice(first, last + 1, step)
    return indices


class _Pair:
    """The halves a record name (`<digest>-<epoch>`) owns, and which one it writes next."""

    __slots__ = ("digest", "epoch", "pair", "slab", "turn")

    def __init__(self, slab: Slab, pair: int, digest: bytes, epoch: int) -> None:
        self.slab, self.pair, self.turn, self.digest, self.epoch = slab, pair, 0, digest, epoch

    def next_half(self) -> int:
        index = 2 * self.pair + self.turn
        self.turn = 1 - self.turn
        return index


class LocalDirectoryStore(SessionStore):
    def __init__(self, directory: Path, clock=time.time) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._root = str(self.directory)
        self._clock = clock
        self._seq = time.time_ns()
        self._slabs = SlabFiles(self._root)
        self._pairs: dict[str, _Pair] = {}
        self._checked: dict[str, int] = {}  # the take count when a record's epoch was read
        # the checkpoint writer, the event loop and the janitor share the slabs
        self._lock = threading.RLock()

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

    def _let_go(self, name: str) -> None:
        """What this process keeps for the record `name`: its check and its halves."""
        self._checked.pop(name, None)
        pair = self._pairs.pop(name, None)
        if pair is not None:
            self._slabs.release(pair.slab, pair.pair)

    def _halves(self, name: str, epoch: int, need: int) -> tuple[_Pair, _Pair | None]:
        """The pair `name` writes (a larger one when the record outgrew its halves) and the
        one it leaves, to clear once the record is written elsewhere."""
        old = self._pairs.get(name)
        if old is not None and old.slab.half >= need:
            return old, None
        slab, index = self._slabs.allocate(need)
        digest = bytes.fromhex(name.rpartition("-")[0])
        self._pairs[name] = pair = _Pair(slab, index, digest, epoch)
        return pair, old

    def _seal(self, pair: _Pair, half: memoryview, meta: bytes, state_at: int, state_len: int,
              ring_len: int, expires_at: float) -> None:
        """The meta in place and the half sealed (its state and ring already are)."""
        half[HEAD:HEAD + len(meta)] = meta
        commit(half, pair.digest, pair.epoch, expires_at, self._next_seq(), len(meta), state_at,
               state_len, ring_len)

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns())
        return self._seq

    def _write(self, name: str, epoch: int, record: SessionRecord,
               expires_at: float) -> _Pair | None:
        """The record in its next half; returns the pair it left (it outgrew its halves)."""
        meta = meta_bytes(record)
        state = record.state if isinstance(record.state, tuple) else (record.state,)
        data = b"".join((*state, record.ring))
        state_at = HEAD + len(meta)
        pair, old = self._halves(name, epoch, state_at + len(data))
        half = pair.slab.at(pair.next_half())
        half[state_at:state_at + len(data)] = data
        self._seal(pair, half, meta, state_at, len(data) - len(record.ring), len(record.ring),
                   expires_at)
        return old

    def put_many(self, items: list[tuple[str, SessionRecord, int]], ttl: float) -> list[bool]:
        expires_at = self._clock() + ttl
        with self._lock:
            written, left = [], {}
            for token, record, epoch in items:
                name = f"{token_hash(token)}-{epoch}"
                left[name] = self._write(name, epoch, record, expires_at)
                written.append((name, epoch))
            results, fenced = self._confirm(written, left)
        self._fence(fenced)
        return results

    def put_rows(self, batch: RowBatch, ttl: float) -> list[bool]:
        """The slice's state bytes go to their halves with one indexed copy per part and slab
        file; each half then gets its meta, blob head and tail, ring, header and CRC."""
        expires_at = self._clock() + ttl
        width = sum(part.shape[1] for part in batch.parts)
        with self._lock:
            placed, by_slab, written, left = [], {}, [], {}
            try:
                for i, (token, record, epoch) in enumerate(batch.items):
                    name = f"{token_hash(token)}-{epoch}"
                    meta = meta_bytes(record)
                    head, tail = batch.heads[i], batch.tails[i]
                    if HEAD + len(meta) + len(head) > BODY_AT:  # long options: cut as a whole
                        left[name] = self._write(name, epoch, batch.item(i)[1], expires_at)
                    else:
                        need = BODY_AT + width + len(tail) + len(record.ring)
                        pair, left[name] = self._halves(name, epoch, need)
                        placed.append((i, pair, pair.next_half(), meta))
                        rows, halves = by_slab.setdefault(pair.slab, ([], []))
                        rows.append(i)
                        halves.append(placed[-1][2])
                    written.append((name, epoch))
            except BaseException:  # no room for a larger pair, say: nothing placed is written
                self._unplace(placed, left)
                raise
            for slab, (rows, halves) in by_slab.items():
                src, dst = _run(rows, 1), _run(halves, 2)
                at = BODY_AT
                for part in batch.parts:  # (B, n): the rows of this slab's sessions
                    slab.halves[dst, at:at + part.shape[1]] = part[src]
                    at += part.shape[1]
            for i, pair, index, meta in placed:
                ring, head, tail = batch.items[i][1].ring, batch.heads[i], batch.tails[i]
                half = pair.slab.at(index)
                end = BODY_AT + width
                half[BODY_AT - len(head):BODY_AT] = head
                half[end:end + len(tail) + len(ring)] = tail + ring
                self._seal(pair, half, meta, BODY_AT - len(head), len(head) + width + len(tail),
                           len(ring), expires_at)
            results, fenced = self._confirm(written, left)
        self._fence(fenced)
        return results

    def _unplace(self, placed: list[tuple], left: dict[str, _Pair | None]) -> None:
        """Undo the placing of records not written: each writes the half it would have
        written next time, and one that was given a larger pair keeps its old one."""
        for _, pair, _, _ in placed:
            pair.turn = 1 - pair.turn
        for name, old in left.items():
            pair = self._pairs.get(name)
            if old is not None and pair is not None and pair is not old:
                self._slabs.release(pair.slab, pair.pair)
                self._pairs[name] = old

    def _confirm(self, written: list[tuple[str, int]],
                 left: dict[str, _Pair | None]) -> tuple[list[bool], list[tuple]]:
        """Whether each write counts, and (name, the pair it left) of those that do not
        (fenced).

        Read back after the write: a take that has not moved the epoch on yet reads this
        record (or a later one), since a take moves the epoch before it looks for the record;
        so the write counts. The count is read before any epoch, so a take that moves one
        after it has counted itself after it too. The pair a record left (it outgrew it) is
        cleared once the write counts; a fenced record's pairs are left to `_fence`."""
        takes, results, fenced = self._takes(), [], []
        for name, epoch in written:
            ok = takes is not None and self._checked.get(name) == takes
            if not ok:
                digest = name.rpartition("-")[0]
                ok = self._epoch(digest) == epoch
                if ok:
                    if takes is not None:
                        self._checked[name] = takes
                    if epoch:
                        with contextlib.suppress(FileNotFoundError):
                            os.utime(self._path(digest + ".epoch"))  # purge keeps a used epoch
            old = left.get(name)
            if not ok:
                fenced.append((name, old))
            elif old is not None:
                self._slabs.release(old.slab, old.pair)
            results.append(ok)
        return results, fenced

    def _fence(self, fenced: list[tuple[str, _Pair | None]]) -> None:
        """Let fenced records go (and the pairs they left), holding the directory's lock: a
        take (in any process) that moved their epoch may be reading these halves, and a pair
        freed now could be handed to another session and written while it does."""
        if fenced:
            with self._locked(), self._lock:
                for name, old in fenced:
                    self._let_go(name)
                    if old is not None:
                        self._slabs.release(old.slab, old.pair)

    def _halves_of(self, slab: Slab, digest: bytes, epoch: int) -> list[int]:
        """The halves of a slab file that carry this record's name (whole or not)."""
        found = []
        for index in slab.find(digest):
            head = slab.head_of(index)  # None: cleared since the scan
            if head is not None and head[1] == epoch:
                found.append(index)
        return found

    def take(self, token: str) -> SessionRecord | None:
        digest = token_hash(token)
        raw_digest = bytes.fromhex(digest)
        with self._locked(), self._lock:
            epoch = self._epoch(digest)
            if not any(self._halves_of(slab, raw_digest, epoch) for slab in self._slabs.each()):
                return None  # nothing to take: the epoch stays (its owner may not have written)
            # The epoch moves on, then the record is looked for and read: a write its writer
            # was told counts landed before the move, so it is found (a later one may be read
            # too, being newer, but its writer is told it does not count). Each half is
            # checked to carry this name when it is read and again when it is cleared: our
            # processes free a pair only under this lock, so none is handed to another
            # session meanwhile, but the check costs nothing.
            tmp = self._path(f".{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(str(epoch + 1).encode())
            with self._moving_epoch():
                os.replace(tmp, self._path(digest + ".epoch"))
            best = None
            for slab in self._slabs.each():
                for index in self._halves_of(slab, raw_digest, epoch):
                    got = parse(bytes(slab.at(index)))
                    if (got is not None and got[0] == raw_digest and got[1] == epoch
                            and (best is None or got[3] > best[3])):
                        best = got
                    head = slab.head_of(index)
                    if head is not None and head[:2] == (raw_digest, epoch):
                        slab.clear_half(index)
            self._let_go(f"{digest}-{epoch}")
        if best is None or best[2] < self._clock():
            return None
        return record_from(best[4], best[5], best[6], epoch + 1)

    def epoch_of(self, token: str) -> int:
        """The token's epoch here (0 until a take moves it)."""
        return self._epoch(token_hash(token))

    def forget(self, token: str, epoch: int) -> None:
        # under the directory's lock: the pair it frees must not be reused while a take reads
        with self._locked(), self._lock:
            self._let_go(f"{token_hash(token)}-{epoch}")

    def records(self) -> list[tuple[str, int]]:
        """(token digest, epoch) of every whole, unexpired record in the directory."""
        now, out = self._clock(), set()
        with self._lock:
            for slab in self._slabs.each():
                for index, digest, epoch, expires_at in slab.heads():
                    if expires_at >= now and parse(bytes(slab.at(index))) is not None:
                        out.add((digest.hex(), epoch))
        return sorted(out)

    def purge_expired(self) -> int:
        """Records past their time, and slab files of dead processes with nothing left to
        take; returns how many records went."""
        now, gone, named = self._clock(), 0, set()
        # under the directory's lock: pairs freed here must not be reused while a take reads
        with self._locked(), self._lock:
            for name, pair in list(self._pairs.items()):
                heads = [pair.slab.head_of(2 * pair.pair + turn) for turn in (0, 1)]
                if any(h is not None and h[2] >= now for h in heads):
                    continue  # a live owner always has one half written within resume_ttl / 2
                gone += any(h is not None for h in heads)
                self._let_go(name)
            for slab in self._slabs.each():
                heads = slab.heads()
                named.update(digest.hex() for _, digest, _, _ in heads)
                if slab.own or not self._slabs.orphan(slab):
                    continue
                current = {d: self._epoch(d.hex()) for _, d, _, _ in heads}
                if any(expires_at >= now and current[d] == epoch
                       for _, d, epoch, expires_at in heads):
                    continue  # a dead process's records: still to be taken
                gone += len({(d, epoch) for _, d, epoch, _ in heads})
                self._slabs.remove(slab)
        # the epoch of a session taken long ago and not written since (ended, or idle); counted
        # like a take, since a writer at that epoch must now be told it lost the session
        for path in self.directory.glob("*.epoch"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < time.time() - _EPOCH_KEEP and path.stem not in named:
                    with self._locked(), self._moving_epoch():
                        path.unlink()
        for path in self.directory.glob(".*.tmp"):  # left by a process killed mid-write
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < time.time() - 60:
                    path.unlink()
        for path in self.directory.glob("*.rec"):  # a record file of the layout before slabs
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < time.time() - _EPOCH_KEEP:
                    path.unlink()
        return gone

    def close(self) -> None:
        with self._lock:
            self._slabs.close()
