"""Record files written through shared memory maps: a checkpoint write is a memory copy.

A checkpoint pass writes hundreds of record files from the writer thread. Written with
`open`/`pwritev`/`close`, each record costs three system calls, and each call hands the GIL to
the event loop and waits to get it back: with the loop busy (a saturated server) a pass of 500
records took 6 s and 200 ms of CPU instead of 7 ms (measured, BENCHMARKS.md session 10), and
the hand-offs slowed the loop too. A file mapped once (MAP_SHARED) is rewritten by copying into
the mapping: no system call, no GIL hand-off, and the bytes are in the page cache at once, so a
SIGKILL right after the copy keeps them exactly as `pwritev` would. Space is reserved with
`posix_fallocate` when a file is mapped, so on ext4, xfs or tmpfs a full disk is an error
there, not a SIGBUS in the middle of a copy; on copy-on-write file systems (btrfs, ZFS) an
overwrite needs new blocks, and a full disk (or an I/O error) can still end the process with
SIGBUS: keep `snapshot_dir` on another file system there. The copy holds the GIL through its
page faults, so a fault that waits for the disk (memory pressure, dirty-page throttling)
waits with the event loop; at ~13 KB per session per second that has not been seen here.
Mappings are kept in an LRU (`limit`), closed when evicted or dropped.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

from cachetools import LRUCache

_PAGE = mmap.PAGESIZE


def _reserve(fd: int, length: int, capacity: int) -> None:
    """Blocks for the whole file now; a file system without fallocate gets real zeros."""
    if capacity <= length:
        return
    try:
        os.posix_fallocate(fd, 0, capacity)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise  # ENOSPC and the like: this write fails, as a write() would
        os.pwrite(fd, bytes(capacity - length), length)


class _Mappings(LRUCache):
    def popitem(self):
        path, view = super().popitem()
        view.close()  # evicted: the next write to it maps it again
        return path, view


class MappedFiles:
    """Writable mappings of files by path. Thread-safe."""

    def __init__(self, limit: int = 8192) -> None:
        self._maps = _Mappings(maxsize=limit)
        self._lock = threading.Lock()

    def write(self, path: str, parts: list) -> None:
        """Overwrite the start of the file at `path` with `parts` (bytes-like, in order);
        bytes past them stay as they were."""
        # joined first, then one copy into the map: a slice assignment per part cost ~3x more
        # (6.4 vs 2.0 us per 17 KB record in one process); a cut copy fails the CRC either way
        data = b"".join(parts)
        size = len(data)
        with self._lock:
            view = self._maps.get(path)
            if view is None or len(view) < size:
                view = self._map(path, size)
            view[:size] = data

    def _map(self, path: str, size: int) -> mmap.mmap:
        old = self._maps.pop(path, None)
        if old is not None:
            old.close()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # room to grow (a reply ring fills up, sample counts get longer) without remapping
            length = os.fstat(fd).st_size
            capacity = max(-(-(size + size // 4) // _PAGE) * _PAGE, length)
            _reserve(fd, length, capacity)
            view = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)
        self._maps[path] = view
        return view

    def drop(self, path: str) -> None:
        """Forget the mapping of a file that is (about to be) removed."""
        with self._lock:
            view = self._maps.pop(path, None)
            if view is not None:
                view.close()

    def __len__(self) -> int:
        return len(self._maps)
