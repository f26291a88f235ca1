"""The objects one server process shares between its HTTP and WebSocket handlers."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server.auth import Guard
from server.errors import ServeError
from server.handoff import Handoff
from server.local_store import LocalDirectoryStore
from server.metrics import Metrics
from server.models import LoadedModel
from server.predict_worker import PredictPool
from server.replica_handoff import ReplicaHandoff
from server.scheduler import Scheduler
from server.sessions import SessionManager
from server.settings import Settings
from server.store import SessionStore

log = logging.getLogger("s4serve.runtime")


def make_store(settings: Settings) -> SessionStore:
    local = LocalDirectoryStore(settings.snapshot_dir)
    if settings.store is None:
        return local
    if not settings.store.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"store must be a redis:// URL or unset, not {settings.store!r}")
    from server.redis_store import RedisStore  # redis-py only when it is used

    return RedisStore(settings.store, local)


@dataclass(eq=False)
class Runtime:
    settings: Settings
    metrics: Metrics
    guard: Guard
    scheduler: Scheduler
    store: SessionStore
    manager: SessionManager
    models: dict[str, LoadedModel] = field(default_factory=dict)
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    links: set = field(default_factory=set)  # the admitted connections (server/link.py)
    handoff: Handoff | None = None  # the other workers of this server
    replicas: ReplicaHandoff | None = None  # every server sharing the Redis store
    pending_requests: int = 0
    # One worker: predict requests queue instead of running side by side and exhausting memory.
    predict_pool: PredictPool | None = None  # predict worker processes, when configured
    predict_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="s4serve-predict")
    )
    _errors: dict = field(default_factory=dict)  # s4serve_errors_total children by code

    @classmethod
    def create(cls, settings: Settings, store: SessionStore | None = None) -> Runtime:
        metrics = Metrics(settings.run_dir / "metrics" if settings.run_dir else None)
        metrics.session_limit.set(settings.max_sessions)
        scheduler = Scheduler(
            metrics, settings.scheduler_max_batch, settings.scheduler_tick,
            settings.tick_samples, settings.max_queued_frames, settings.max_lag,
            press_lag=settings.press_lag, max_queued_bytes=settings.max_queued_mb << 20,
        )
        store = store or make_store(settings)
        manager = SessionManager(scheduler, store, metrics, settings.resume_ttl, settings.secret,
                                 settings.reply_ring_bytes)
        guard = Guard(settings.api_keys, settings.allowed_origins)
        return cls(settings, metrics, guard, scheduler, store, manager)

    @property
    def workers(self) -> int:
        return self.settings.workers if self.settings.run_dir else 1

    def _ready_marker(self) -> Path | None:
        run_dir = self.settings.run_dir
        return run_dir / "ready" / str(self.settings.worker_id) if run_dir else None

    def mark_ready(self, ready: bool) -> None:
        """Readiness as the other workers see it (a marker file per worker)."""
        marker = self._ready_marker()
        if marker is None:
            return
        if ready:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def all_ready(self) -> bool:
        """This worker is ready, and so is every other worker of the server."""
        if not self.ready or self.draining:
            return False
        if self.settings.run_dir is None:
            return True
        return len(list((self.settings.run_dir / "ready").iterdir())) >= self.workers

    def model(self, name: str) -> LoadedModel:
        try:
            return self.models[name]
        except KeyError:
            raise ServeError("model_not_found", f"no model named {name!r}") from None

    @property
    def connections(self) -> int:
        return len(self.links)

    def error(self, code: str) -> None:
        child = self._errors.get(code)
        if child is None:  # a label lookup takes a lock: resolved once per code
            child = self._errors[code] = self.metrics.errors.labels(code)
        child.inc()

    async def drain(self, timeout: float = 10.0) -> None:
        """Refuse new work, close every session (its state goes to the store), wait for them."""
        self.draining = True
        self.mark_ready(False)
        sessions = len(self.manager.live)
        # every connection (each session's owner is one, or a mux connection's handle), those
        # without a session yet too: they would open one after this
        for link in list(self.links):
            link.kick(1001, "server_shutdown")
        deadline = asyncio.get_running_loop().time() + timeout
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        log.info("drained %d sessions; %d connections left", sessions, self.connections)
