"""Where sessions wait to be resumed, and where live sessions keep their checkpoints.

`SessionStore` is the interface; `LocalDirectoryStore` keeps one small JSON file per session
(the default, survives a restart or a SIGKILL of this process). A shared store (Redis)
implements the same methods so that a session can resume on another replica.

One owner per session: every token has an epoch in the store, moved on by each `take`. A
write names the epoch its owner holds and is refused (False) once another process has taken
the session since, so an owner that lost its session can neither advance it in the store nor
bring back a stale copy: it learns from the refusal and closes its connection.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_EPOCH_KEEP = 3600.0  # seconds an epoch outlives its record (live owners refresh it)


@dataclass
class SessionRecord:
    """Everything needed to continue a session: its options and a state blob."""

    session_id: str
    model: str
    dtype: str
    sample_rate: float | None
    output: str
    samples: int
    state: str  # state blob (server/state_blob.py)
    live: bool = False  # a checkpoint of a session that was live when it was written
    epoch: int = 0  # set by `take`: the epoch the new owner holds


def record_json(record: SessionRecord) -> str:
    """The record as JSON; its state blob (base64, nothing to escape) is appended as is,
    which halves the cost of encoding a checkpoint."""
    fields = dict(vars(record))
    state = fields.pop("state")
    return json.dumps(fields)[:-1] + ', "state": "' + state + '"}'


class SessionStore(ABC):
    @abstractmethod
    def put(self, token: str, record: SessionRecord, ttl: float, epoch: int = 0) -> bool:
        """Keep `record` under `token` for `ttl` seconds (replacing any older one), unless
        the session was taken at a later epoch than `epoch` (then False, nothing written)."""

    def put_many(self, items: list[tuple[str, SessionRecord, int]], ttl: float) -> list[bool]:
        """`put` for many (token, record, epoch); stores override it with one round trip."""
        return [self.put(token, record, ttl, epoch) for token, record, epoch in items]

    @abstractmethod
    def take(self, token: str) -> SessionRecord | None:
        """Remove and return the record (its `epoch` is the new owner's), or None when
        unknown or expired. Atomic: of two concurrent callers at most one gets it."""

    @abstractmethod
    def forget(self, token: str, epoch: int) -> None:
        """The session ended: drop its record (unless taken at a later epoch)."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Drop expired records; returns how many."""


class LocalDirectoryStore(SessionStore):
    """Files `<sha256>.json` (the record) and `.epoch` per token; every put, batch of puts
    or take holds the directory's lock (flock on `.lock`), so the workers of one server
    sharing the directory agree."""

    def __init__(self, directory: Path, clock=time.time) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clock = clock

    def _base(self, token: str) -> Path:
        # Tokens are client-supplied: hash them so they can never name another path.
        return self.directory / hashlib.sha256(token.encode()).hexdigest()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _epoch(base: Path) -> int | None:
        try:
            return int(Path(f"{base}.epoch").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def put(self, token: str, record: SessionRecord, ttl: float, epoch: int = 0) -> bool:
        return self.put_many([(token, record, epoch)], ttl)[0]

    def put_many(self, items: list[tuple[str, SessionRecord, int]], ttl: float) -> list[bool]:
        expires_at, results = self._clock() + ttl, []
        with self._locked():
            for token, record, epoch in items:
                base = self._base(token)
                current = self._epoch(base)
                if current is not None and current != epoch:
                    results.append(False)
                    continue
                tmp = self.directory / f".{uuid.uuid4().hex}.tmp"
                tmp.write_text(f'{{"expires_at": {expires_at!r}, "record": {record_json(record)}}}')
                os.replace(tmp, f"{base}.json")
                results.append(True)
        return results

    def take(self, token: str) -> SessionRecord | None:
        base = self._base(token)
        with self._locked():
            try:
                data = json.loads(Path(f"{base}.json").read_text())
            except FileNotFoundError:
                return None
            Path(f"{base}.json").unlink()
            if data["expires_at"] < self._clock():
                return None
            epoch = (self._epoch(base) or 0) + 1
            Path(f"{base}.epoch").write_text(str(epoch))
        return SessionRecord(**{**data["record"], "epoch": epoch})

    def forget(self, token: str, epoch: int) -> None:
        base = self._base(token)
        with self._locked():
            current = self._epoch(base)
            if current is None or current == epoch:
                Path(f"{base}.json").unlink(missing_ok=True)

    def purge_expired(self) -> int:
        removed = 0
        now = self._clock()
        for path in self.directory.glob("*.json"):
            try:
                expired = json.loads(path.read_text())["expires_at"] < now
            except (OSError, ValueError, KeyError):
                continue
            if expired:
                base = path.with_suffix("")
                with self._locked():
                    for suffix in (".json", ".epoch"):
                        Path(f"{base}{suffix}").unlink(missing_ok=True)
                removed += 1
        # the epoch of a session taken long ago and never checkpointed since (ended, or idle)
        for path in self.directory.glob("*.epoch"):
            base = path.with_suffix("")
            with contextlib.suppress(OSError):
                if (not Path(f"{base}.json").exists()
                        and path.stat().st_mtime < time.time() - _EPOCH_KEEP):
                    path.unlink()
        return removed
