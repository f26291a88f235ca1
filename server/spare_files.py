"""Record files kept for reuse instead of deleted.

Creating a file is cheap in a fresh directory but not in one with churn: ext4's inode
allocator skips inodes deleted in the last minutes and reads each one to find that out, so in
the local store's directory after a day of tests a create cost 474 µs of kernel CPU (42 µs in a
fresh directory, measured here), and a store whose sessions come and go creates two files per
new session: ~10% of a loaded server's CPU in a 10 s run of 500 new mux sessions. A file whose
record is over (its session ended, or expired: nobody writes it any more) is therefore blanked
and moved into `.spare/`, and a new record file is a spare renamed into place. A rename claims
a spare atomically (of two processes renaming the same one, one gets ENOENT), and a blanked
file holds no record until its new owner writes one (its magic is gone).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from pathlib import Path

LIST_EVERY_S = 1.0  # with no spare known, the directory is listed again at most this often


class SpareFiles:
    def __init__(self, directory: Path, blank: int, keep: int = 4096) -> None:
        self.root = str(directory / ".spare")
        os.makedirs(self.root, exist_ok=True)
        self._blank = bytes(blank)  # zeros over a record's head: no longer a record
        self._keep = keep
        self._known: list[str] = []  # spares listed (another process may have taken some)
        self._listed = 0.0
        self._lock = threading.Lock()

    def retire(self, path: str) -> None:
        """The record file at `path` is over: blanked and kept (removed past `keep` spares)."""
        try:
            if len(self._known) >= self._keep:
                raise OSError("enough spares")
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, self._blank, 0)
            finally:
                os.close(fd)
            name = uuid.uuid4().hex
            os.rename(path, f"{self.root}/{name}")
        except FileNotFoundError:
            return
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        with self._lock:
            self._known.append(name)

    def adopt(self, path: str) -> bool:
        """A spare moved to `path` (which its caller alone creates); False: none left."""
        with self._lock:
            if not self._known and time.monotonic() - self._listed >= LIST_EVERY_S:
                self._listed = time.monotonic()
                self._known = os.listdir(self.root)
            while self._known:
                try:
                    os.rename(f"{self.root}/{self._known.pop()}", path)
                    return True
                except FileNotFoundError:  # taken by another process
                    continue
        return False

    def __len__(self) -> int:
        return len(self._known)
