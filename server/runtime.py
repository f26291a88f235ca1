"""The objects one server process shares between its HTTP and WebSocket handlers."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from server.auth import Guard
from server.errors import ServeError
from server.metrics import Metrics
from server.models import LoadedModel
from server.scheduler import Scheduler
from server.sessions import SessionManager
from server.settings import Settings
from server.store import LocalDirectoryStore, SessionStore

log = logging.getLogger("s4serve.runtime")


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
    connections: int = 0
    pending_requests: int = 0
    # One worker: predict requests queue instead of running side by side and exhausting memory.
    predict_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="s4serve-predict")
    )

    @classmethod
    def create(cls, settings: Settings, store: SessionStore | None = None) -> Runtime:
        metrics = Metrics()
        metrics.session_limit.set(settings.max_sessions)
        scheduler = Scheduler(
            metrics, settings.scheduler_max_batch, settings.scheduler_tick,
            settings.tick_samples, settings.max_queued_frames, settings.max_lag,
        )
        store = store or LocalDirectoryStore(settings.snapshot_dir)
        manager = SessionManager(scheduler, store, metrics, settings.resume_ttl)
        guard = Guard(settings.api_keys, settings.allowed_origins)
        return cls(settings, metrics, guard, scheduler, store, manager)

    def model(self, name: str) -> LoadedModel:
        try:
            return self.models[name]
        except KeyError:
            raise ServeError("model_not_found", f"no model named {name!r}") from None

    def error(self, code: str) -> None:
        self.metrics.errors.labels(code).inc()

    async def drain(self, timeout: float = 10.0) -> None:
        """Refuse new work, close every session (its state goes to the store), wait for them."""
        self.draining = True
        owners = self.manager.owners()
        for owner in owners:
            owner.kick(1001, "server_shutdown")
        deadline = asyncio.get_running_loop().time() + timeout
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        log.info("drained %d sessions; %d connections left", len(owners), self.connections)
