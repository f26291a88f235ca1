"""Where dropped sessions wait to be resumed.

`SessionStore` is the interface; `LocalDirectoryStore` keeps one small JSON file per session
(the default, survives a restart of this process). A shared store (Redis) implements the same
three methods so that a session can resume on another replica.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path


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


class SessionStore(ABC):
    @abstractmethod
    def put(self, token: str, record: SessionRecord, ttl: float) -> None:
        """Keep `record` under `token` for `ttl` seconds (replacing any older one)."""

    @abstractmethod
    def take(self, token: str) -> SessionRecord | None:
        """Remove and return the record, or None when unknown or expired. Atomic: of two
        concurrent callers at most one gets it."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Drop expired records; returns how many."""


class LocalDirectoryStore(SessionStore):
    def __init__(self, directory: Path, clock=time.time) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clock = clock

    def _path(self, token: str) -> Path:
        # Tokens are client-supplied: hash them so they can never name another path.
        return self.directory / (hashlib.sha256(token.encode()).hexdigest() + ".json")

    def put(self, token: str, record: SessionRecord, ttl: float) -> None:
        data = {"expires_at": self._clock() + ttl, "record": asdict(record)}
        tmp = self.directory / f".{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._path(token))

    def take(self, token: str) -> SessionRecord | None:
        claimed = self.directory / f".{uuid.uuid4().hex}.claimed"
        try:
            os.replace(self._path(token), claimed)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(claimed.read_text())
        finally:
            claimed.unlink(missing_ok=True)
        if data["expires_at"] < self._clock():
            return None
        return SessionRecord(**data["record"])

    def purge_expired(self) -> int:
        removed = 0
        now = self._clock()
        for path in self.directory.glob("*.json"):
            try:
                expired = json.loads(path.read_text())["expires_at"] < now
            except (OSError, ValueError, KeyError):
                continue
            if expired:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
