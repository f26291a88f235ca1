"""Slab files: the local store's records in fixed slots of shared memory maps.

One file per session cost its creation (open, fallocate, mmap, first-touch faults: ~150 us per
record, two per session, measured in session 14) and an unlink at its end, and past a few
thousand sessions the mappings no longer fitted their LRU. A slab file is created and mapped
once for `PAIRS` sessions: a session takes a pair of slots ("halves") and writes them in
turn, so a write cut short (a SIGKILL mid-copy, or read while it lands) leaves the other one
whole. A write is a copy into the mapping: no system call, no GIL hand-off (see docs/server.md), and
the bytes are in the page cache at once, so a SIGKILL right after it keeps them.

A half: header (`_HEAD`: magic, token digest, epoch, expires_at, write sequence, where its
meta, state and reply ring lie) and CRC-32, then the meta JSON; the state at `state_at` (at
least after the meta; a checkpoint puts the state's tensor bytes at `BODY_AT` in every half so
that a slice of sessions is copied in with one indexed copy), the ring right after the state.
The CRC covers the header, the meta, the state and the ring, and is written last: a half
whose CRC does not check is not a record.

Files are named `<uuid>-<half bytes>.slab`; the process that made one holds a shared flock on
it while it lives, so a purge elsewhere removes only the files of dead processes, and only
once none of their records can still be taken. A file is reserved with `posix_fallocate` and
zero-filled when made, so a full disk is an error then, not a SIGBUS in a copy; on
copy-on-write file systems (btrfs, ZFS) keep `snapshot_dir` elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import uuid
from collections.abc import Iterator

import numpy as np
from cachetools import LRUCache
from zlib_ng.zlib_ng import crc32

_HEAD = struct.Struct("<4s32sQdQIIII")  # magic, digest, epoch, expires_at, seq, meta_len,
_CRC = struct.Struct("<I")              # state_at, state_len, ring_len; then the CRC
HEAD = _HEAD.size + _CRC.size
BODY_AT = 4096  # where a checkpoint copies a state's tensor bytes in each half
MAGIC = b"S4SL"
# sessions per file: a file is zero-filled when made, so a larger one pays up front for pairs
# nobody uses yet (files doubling up to 1024 pairs made the first pass of 1000 new sessions
# 228-321 ms instead of 101-134 ms, in process)
PAIRS = 64
_PAGE = mmap.PAGESIZE
_CRC_PIECE = 4096


def crc(data, value: int = 0) -> int:
    """CRC-32 in pieces under 5 KiB: zlib(-ng) releases the GIL for a longer buffer, and the
    writer thread would then wait for the busy event loop to hand it back (measured: 50
    checksums of 13 KB took 43 ms of wall time beside a busy thread; in 4 KB pieces 0.2 ms)."""
    view = memoryview(data).cast("B")
    for at in range(0, len(view), _CRC_PIECE):
        value = crc32(view[at:at + _CRC_PIECE], value)
    return value


def half_for(need: int) -> int:
    """The half size for a record of `need` bytes: room to grow (a reply ring filling up)."""
    return -(-(need + need // 4) // _PAGE) * _PAGE


def commit(half: memoryview, digest: bytes, epoch: int, expires_at: float, seq: int,
           meta_len: int, state_at: int, state_len: int, ring_len: int) -> None:
    """Seal a half whose meta (at HEAD), state and ring are in place: header and CRC last."""
    head = _HEAD.pack(MAGIC, digest, epoch, expires_at, seq, meta_len, state_at, state_len,
                      ring_len)
    value = crc(half[state_at:state_at + state_len + ring_len],
                crc32(half[HEAD:HEAD + meta_len], crc32(head)))
    half[:HEAD] = head + _CRC.pack(value)


def parse(raw: bytes) -> tuple[bytes, int, float, int, bytes, bytes, bytes] | None:
    """(digest, epoch, expires_at, seq, meta, state, ring) of a half's bytes (a copy: the
    owner may be writing it), or None when it holds no whole record."""
    if len(raw) < HEAD or raw[:4] != MAGIC:
        return None
    _, digest, epoch, expires_at, seq, meta_len, state_at, state_len, ring_len = \
        _HEAD.unpack_from(raw)
    end = state_at + state_len + ring_len
    if HEAD + meta_len > state_at or end > len(raw):
        return None
    view = memoryview(raw)
    value = crc(view[state_at:end], crc32(view[HEAD:HEAD + meta_len], crc32(view[:_HEAD.size])))
    if value != _CRC.unpack_from(raw, _HEAD.size)[0]:
        return None
    ring_at = state_at + state_len
    return (digest, epoch, expires_at, seq, raw[HEAD:HEAD + meta_len], raw[state_at:ring_at],
            raw[ring_at:end])


def _reserve(fd: int, size: int) -> None:
    """Blocks for the whole file now, and real zeros in the page cache: a first copy into a
    page that was only allocated faults for ~5 us (22-30 us per 24 KB half, measured on
    ext4), one into a page already written costs nothing more than the copy."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise  # ENOSPC and the like: this write fails, as a write() would
    os.pwrite(fd, bytes(size), 0)


class Slab:
    """One mapped slab file: `halves` (2 * pairs, half) bytes, pair p is halves 2p and 2p+1."""

    def __init__(self, path: str, half: int, fd: int, own: bool) -> None:
        size = os.fstat(fd).st_size // (2 * half) * 2 * half
        self.path, self.half, self.own = path, half, own
        self.fd = fd if own else None  # an owner keeps its file open: the flock says it lives
        self.map = mmap.mmap(fd, size) if size else None
        self.view = memoryview(self.map) if size else memoryview(b"")
        self.halves = (np.frombuffer(self.map, np.uint8).reshape(-1, half) if size
                       else np.zeros((0, half), np.uint8))
        self.free = list(range(size // (2 * half) - 1, -1, -1)) if own else []

    def at(self, index: int) -> memoryview:
        return self.view[index * self.half:(index + 1) * self.half]

    def find(self, digest: bytes) -> list[int]:
        """Halves that carry this digest (any epoch, whole or not)."""
        heads = self.halves[:, :36]
        hits = ((heads[:, :4] == np.frombuffer(MAGIC, np.uint8)).all(1)
                & (heads[:, 4:36] == np.frombuffer(digest, np.uint8)).all(1))
        return np.flatnonzero(hits).tolist()

    def heads(self) -> list[tuple[int, bytes, int, float]]:
        """(half, digest, epoch, expires_at) of the halves with a record header."""
        hits = np.flatnonzero((self.halves[:, :4] == np.frombuffer(MAGIC, np.uint8)).all(1))
        return [(index, *self.head_of(index)) for index in hits.tolist()]

    def head_of(self, index: int) -> tuple[bytes, int, float] | None:
        """(digest, epoch, expires_at) of a half with a record header (not checked)."""
        magic, digest, epoch, expires_at, *_ = _HEAD.unpack_from(self.view, index * self.half)
        return (digest, epoch, expires_at) if magic == MAGIC else None

    def clear_half(self, index: int) -> None:
        self.view[index * self.half:index * self.half + 4] = bytes(4)

    def clear(self, pair: int) -> None:
        """Neither half of the pair is a record any more."""
        self.clear_half(2 * pair)
        self.clear_half(2 * pair + 1)

    def close(self) -> None:
        self.view.release()
        self.halves = None
        if self.map is not None:
            with contextlib.suppress(BufferError):  # a view still exported: the GC closes it
                self.map.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Seen(LRUCache):
    def popitem(self):
        path, slab = super().popitem()
        slab.close()
        return path, slab


class SlabFiles:
    """This process's slab files, with pairs to hand out, and the others' files, mapped to
    read and clear their records. Not thread-safe: the store serialises calls."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.own: dict[str, Slab] = {}
        self._classes: dict[int, list[Slab]] = {}
        self._seen = _Seen(maxsize=4096)  # other processes' files, mapped to be read

    def allocate(self, need: int) -> tuple[Slab, int]:
        """A free pair whose halves hold `need` bytes."""
        half = half_for(need)
        for slab in self._classes.get(half, ()):
            if slab.free:
                return slab, slab.free.pop()
        slab = self._create(half)
        return slab, slab.free.pop()

    def _create(self, half: int) -> Slab:
        name = f"{uuid.uuid4().hex}-{half}.slab"
        tmp = f"{self.root}/.{name}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            _reserve(fd, 2 * half * PAIRS)
            os.rename(tmp, f"{self.root}/{name}")  # whole before anyone scans it
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        slab = Slab(f"{self.root}/{name}", half, fd, own=True)
        self.own[slab.path] = slab
        self._classes.setdefault(half, []).append(slab)
        return slab

    def release(self, slab: Slab, pair: int) -> None:
        slab.clear(pair)
        if slab.own:
            slab.free.append(pair)

    def each(self) -> Iterator[Slab]:
        """Every slab file of the directory, this process's and the others' (mapped once),
        one at a time: a caller is done with a slab before it asks for the next, since mapping
        one more may unmap (close) one handed out before when there are more than the LRU
        keeps."""
        yield from list(self.own.values())
        present = set()
        with os.scandir(self.root) as entries:
            paths = [f"{self.root}/{entry.name}" for entry in entries
                     if entry.name.endswith(".slab")]
        for path in paths:
            if path in self.own:
                continue
            present.add(path)
            slab = self._seen.get(path)
            if slab is None:
                slab = self._map(path)
                if slab is None:
                    continue
            yield slab
        for path in [p for p in self._seen if p not in present]:  # removed by a purge
            self._seen.pop(path).close()

    def _map(self, path: str) -> Slab | None:
        """Another process's file, mapped; None for one that is gone or is no slab file of
        ours (a stray name or size must not stop the scans of the directory)."""
        try:
            half = int(path.rsplit("-", 1)[1].split(".", 1)[0])
        except (ValueError, IndexError):
            return None
        if half < _PAGE or half % _PAGE:  # half_for() makes whole pages, at least one
            return None
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            slab = Slab(path, half, fd, own=False)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        self._seen[path] = slab
        return slab

    def orphan(self, slab: Slab) -> bool:
        """True when the process that made this file is gone (its flock is free)."""
        try:
            fd = os.open(slab.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # releases the probe's lock

    def remove(self, slab: Slab) -> None:
        self._seen.pop(slab.path, None)
        slab.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slab.path)

    def close(self) -> None:
        for slab in [*self.own.values(), *self._seen.values()]:
            slab.close()
        self.own.clear()
        self._classes.clear()
        self._seen.clear()
