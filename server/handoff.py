"""Taking over a session that is live on another worker process of this server.

A resume token names a session that is either live on some worker or waiting in the shared
session store. A worker that finds neither asks the other workers, over their unix sockets in
the run directory, to let go of it: the owner closes its connection (1008 `resumed_elsewhere`)
and detaches the session into the store at once, then answers; the asking worker then takes it
from the store. One line each way: the token, then "1" (released) or "0" (not live here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("s4serve.handoff")
_TIMEOUT = 2.0
_MAX_TOKEN = 256


class Handoff:
    def __init__(self, directory: Path, worker_id: int, workers: int,
                 release: Callable[[str], bool]) -> None:
        self.directory = Path(directory)
        self.worker_id = worker_id
        self.workers = workers
        self.release = release
        self._server: asyncio.AbstractServer | None = None

    def _path(self, worker_id: int) -> Path:
        return self.directory / f"{worker_id}.sock"

    async def start(self) -> None:
        path = self._path(self.worker_id)
        path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._answer, path=str(path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._path(self.worker_id).unlink(missing_ok=True)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), _TIMEOUT)
            token = line.decode("ascii", "replace").strip()
            released = bool(token) and self.release(token)
            writer.write(b"1\n" if released else b"0\n")
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def take_over(self, token: str) -> bool:
        """Ask every other worker to release `token`; True when one did."""
        if not token or len(token) > _MAX_TOKEN or not token.isascii() or not token.isprintable():
            return False
        others = [i for i in range(self.workers) if i != self.worker_id]
        answers = await asyncio.gather(*(self._ask(i, token) for i in others))
        return any(answers)

    async def _ask(self, worker_id: int, token: str) -> bool:
        path = self._path(worker_id)
        if not path.exists():
            return False
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path)), _TIMEOUT)
            writer.write(token.encode("ascii") + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), _TIMEOUT)).strip() == b"1"
        except (OSError, TimeoutError):
            log.warning("worker %d did not answer a handoff request", worker_id)
            return False
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
