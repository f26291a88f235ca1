"""The FastAPI application factory and the uvicorn runner with a graceful SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import http_api, mux_api, ws_api
from server.checkpoints import Checkpointer
from server.errors import ServeError
from server.handoff import Handoff
from server.heap import fix_heap
from server.logs import context_id
from server.models import load_models
from server.predict_job import Limits
from server.predict_worker import PredictPool
from server.redis_store import RedisStore
from server.replica_handoff import ReplicaHandoff
from server.runtime import Runtime
from server.settings import Settings
from server.store import SessionStore
from server.transport import PushProtocol

log = logging.getLogger("s4serve.app")
STATIC = Path(__file__).resolve().parent / "static"
_JANITOR_PERIOD = 30.0


def create_app(settings: Settings | None = None, store: SessionStore | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime.create(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.scheduler.start(asyncio.get_running_loop())
        if settings.run_dir is not None:
            runtime.handoff = Handoff(settings.run_dir / "handoff", settings.worker_id,
                                      settings.workers, runtime.manager.let_go)
            await runtime.handoff.start()
        if isinstance(runtime.store, RedisStore):
            runtime.replicas = ReplicaHandoff(settings.store, runtime.manager.let_go_hashed,
                                              settings.replica_handoff_wait)
            await runtime.replicas.start()
        # Load in the background so /healthz answers at once and /readyz says 503 until done.
        loader = asyncio.create_task(_load(runtime))
        janitor = asyncio.create_task(_purge_expired(runtime))
        tasks = [loader, janitor]
        checkpointer = None
        if settings.checkpoint_interval:
            checkpointer = Checkpointer(runtime.manager, settings.checkpoint_interval,
                                        settings.checkpoint_samples)
            tasks.append(asyncio.create_task(checkpointer.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if runtime.manager.live:
                await runtime.drain()
            if checkpointer is not None:
                checkpointer.close()
            runtime.mark_ready(False)
            if runtime.handoff is not None:
                await runtime.handoff.stop()
            if runtime.replicas is not None:
                await runtime.replicas.stop()
            runtime.scheduler.stop()
            runtime.predict_executor.shutdown(wait=False, cancel_futures=True)
            if runtime.predict_pool is not None:
                runtime.predict_pool.stop()

    # /docs and /openapi.json are routes of our own so that API keys can cover them
    app = FastAPI(title="s4serve", version="1", lifespan=lifespan, docs_url=None,
                  openapi_url=None)
    app.state.runtime = runtime
    app.include_router(http_api.router)
    app.include_router(ws_api.router)
    app.include_router(mux_api.router)
    app.mount("/demo", StaticFiles(directory=STATIC, html=True), name="demo")
    # FastAPI builds included routes on their first request, inside warnings.catch_warnings(),
    # which swaps process-wide state: a request while the models load (a HEALTHCHECK) raced
    # the loader thread and printed the warnings it hides. Build them now, on this thread.
    app.openapi()

    def docs_allowed(request: Request) -> None:
        if not settings.docs_public and not runtime.guard.key_ok(request.headers,
                                                                 request.query_params):
            raise ServeError("unauthorized", "the API docs need a key (Authorization: Bearer "
                             "<key> or ?token=<key>), or docs_public")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        docs_allowed(request)
        schema = copy.deepcopy(app.openapi())
        for path in schema["paths"].values():  # {name}: one of the models served now
            for operation in path.values():
                for parameter in operation.get("parameters", []):
                    if parameter["name"] == "name" and parameter["in"] == "path" \
                            and runtime.models:
                        parameter["schema"]["enum"] = sorted(runtime.models)
        return JSONResponse(schema)

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        docs_allowed(request)
        token = request.query_params.get("token")
        url = "/openapi.json" + (f"?{urlencode({'token': token})}" if token else "")
        return get_swagger_ui_html(openapi_url=url, title="s4serve API")

    @app.get("/", include_in_schema=False)
    async def home(request: Request) -> RedirectResponse:
        query = request.url.query  # keeps ?token= for the demo's API calls
        return RedirectResponse("/demo/" + (f"?{query}" if query else ""))

    @app.websocket("/{path:path}")
    async def unknown_websocket(websocket: WebSocket, path: str) -> None:
        runtime.error("not_found")  # the contract's answer is a close frame, not HTTP 403
        await websocket.accept()
        await websocket.close(code=1008, reason="not_found")
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        runtime.error(exc.code)
        # a stalled upload's connection is not worth keeping (RFC 9110: 408 closes it)
        close = {"connection": "close"} if exc.code == "body_timeout" else None
        return JSONResponse(exc.body(), status_code=exc.http_status, headers=close)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes and methods get the documented body too, not FastAPI's {"detail"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        runtime.error(code)
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in %s %s (request %s)", request.method, request.url.path,
                  getattr(request.state, "request_id", "-"), exc_info=exc)
        runtime.error("internal")
        return JSONResponse(ServeError("internal", "internal error").body(), status_code=500)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        # a client's id is echoed only when it is short and printable
        rid = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex[:16]
        request.state.request_id = rid
        token = context_id.set(rid)
        try:
            response = await call_next(request)
            response.headers["x-request-id"] = context_id.get() or ""
            return response
        finally:
            context_id.reset(token)

    return app


async def _load(runtime: Runtime) -> None:
    settings = runtime.settings
    pool = None
    if not settings.predict_workers:  # predict computes in this process
        fix_heap(settings.predict_memory_mb << 20)
    if settings.predict_workers:
        pool = PredictPool(settings.model_dirs(), settings.device, settings.max_rates,
                           Limits.of(settings),
                           settings.predict_workers, settings.predict_timeout,
                           settings.torch_threads, settings.predict_nice)
    try:
        models, _ = await asyncio.gather(asyncio.to_thread(load_models, settings),
                                         pool.start() if pool else asyncio.sleep(0))
        runtime.models, runtime.predict_pool = models, pool
    except Exception as exc:
        if pool is not None:
            pool.stop()
        runtime.load_error = f"model loading failed: {exc}"
        log.exception("model loading failed")
        return
    for info in (m.info for m in runtime.models.values()):
        runtime.metrics.model_info.labels(
            info.name, info.version, info.layer, info.device, info.backend
        ).set(1)
    # Models, compiled graphs and their caches are millions of long-lived objects: freezing
    # them keeps the cyclic collector's full passes (tens of ms each) off the stream path.
    gc.collect()
    gc.freeze()
    runtime.ready = True
    runtime.mark_ready(True)
    log.info(
        "ready on %s:%d: %s", runtime.settings.host, runtime.settings.port,
        ", ".join(sorted(runtime.models)) or "no models",
    )


async def _purge_expired(runtime: Runtime) -> None:
    while True:
        await asyncio.sleep(_JANITOR_PERIOD)
        try:
            await asyncio.to_thread(runtime.store.purge_expired)
        except Exception:
            log.exception("purging expired sessions failed")


def uvicorn_config(app: FastAPI, settings: Settings, **overrides) -> uvicorn.Config:
    """The uvicorn settings the server needs: the frame size limit is enforced on the wire
    (close 1009 before the message is buffered), and streams get the push transport
    (server/transport.py). Per-message deflate is off: float samples do not compress, and
    zlib per message was a large share of the per-frame cost."""
    options = dict(
        host=settings.host, port=settings.port, ws=PushProtocol,
        ws_max_size=settings.max_frame_bytes, ws_per_message_deflate=False, log_config=None,
        timeout_graceful_shutdown=10,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: /readyz turns 503 and new sessions are refused; after
    `drain_seconds` open sessions are snapshotted to the store and closed (1001), then uvicorn
    shuts down as usual."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._draining: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._draining is not None or self.runtime.draining:
            return super().handle_exit(sig, frame)  # a second signal: stop now
        self.runtime.draining = True
        log.info("signal %s: draining", sig)
        loop = asyncio.get_event_loop()
        self._draining = loop.create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig, frame) -> None:
        try:
            await asyncio.sleep(self.runtime.settings.drain_seconds)
            await self.runtime.drain()
        except Exception:  # the process must still stop (uvicorn's shutdown detaches the rest)
            log.exception("drain failed")
        super().handle_exit(sig, frame)
