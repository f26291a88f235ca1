"""A large predict answer handed from a worker process to the server without crossing the pipe.

The worker writes the answer's bytes straight into a memory file (Linux memfd) and passes its
descriptor over the worker's Unix socket (SCM_RIGHTS); the server maps it read-only and sends
the mapping as the HTTP body. A 41 MB answer (B=64 × L=16000 × 10 outputs) took ~50 ms to
cross the pipe (a copy into the kernel, reads in 64 KB pieces, a copy out); now its bytes are
written once. The file has no name: it is freed when the last mapping and descriptor go, so a
killed worker or server leaves nothing behind. Small answers, and systems without memfd,
use the pipe.
"""

from __future__ import annotations

import mmap
import os
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

import numpy as np

SHARE_BYTES = 1 << 20  # below this the pipe is as quick


class AnswerFile:
    """The memory file of one answer, made on demand by `allocate` (a worker's side)."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def allocate(self, size: int) -> np.ndarray:
        """A writable buffer of `size` bytes: in a memory file when it is worth passing."""
        if size < SHARE_BYTES or not hasattr(os, "memfd_create"):
            return np.empty(size, np.uint8)
        self.close()
        self.fd = os.memfd_create("s4serve-answer", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        # the mapping lives as long as the array (the answer) does, the descriptor until sent
        return np.frombuffer(mmap.mmap(self.fd, size), np.uint8)

    def holds(self, body: object) -> bool:
        """`body` is the answer made in this file (not an error answer made after it)."""
        return self.fd is not None and isinstance(body, memoryview)

    def send(self, conn: Connection, server_pid: int) -> None:
        send_handle(conn, self.fd, server_pid)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def receive(conn: Connection, size: int) -> memoryview:
    """The answer passed by `AnswerFile.send`, mapped read-only (the server's side)."""
    fd = recv_handle(conn)
    try:
        return memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
    finally:
        os.close(fd)
