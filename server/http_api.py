"""The HTTP endpoints: health, readiness, metrics, model listing and batch predict."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import ServeError
from server.heap import rss_bytes, trim
from server.predict_io import NPY_TYPE, PredictBody
from server.predict_job import JSON_TYPE, Answer, Job, Limits, run_job
from server.runtime import Runtime

log = logging.getLogger("s4serve.http")
router = APIRouter()


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _authorize(request: Request) -> Runtime:
    rt = _runtime(request)
    if not rt.guard.key_ok(request.headers):
        raise ServeError("unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")
    return rt


def _probe(request: Request) -> Runtime:
    """The probes and /metrics need a key like every HTTP request (API.md) unless
    probes_public opens them."""
    rt = _runtime(request)
    return rt if rt.settings.probes_public else _authorize(request)


@router.get("/healthz")
async def healthz(request: Request) -> dict:
    _probe(request)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    rt = _probe(request)
    if rt.all_ready():
        return JSONResponse({"status": "ready", "models": sorted(rt.models)})
    status = "draining" if rt.draining else ("failed" if rt.load_error else "loading")
    message = rt.load_error or f"server is {status}"
    return JSONResponse(
        {"status": status, "error": {"code": "not_ready", "message": message}}, status_code=503
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    rt = _probe(request)
    rt.scheduler.flush_metrics()  # this process's ticks since their last flush
    return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    rt = _authorize(request)
    return {"models": [m.info.as_dict() for m in rt.models.values()]}


@router.get("/v1/models/{name}")
async def get_model(name: str, request: Request) -> dict:
    return _authorize(request).model(name).info.as_dict()


_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
_PREDICT_DOC = {
    "requestBody": {"required": True, "content": {
        JSON_TYPE: {"schema": PredictBody.model_json_schema()},
        NPY_TYPE: {"schema": {"type": "string", "format": "binary",
                              "description": "a (batch, length, d_input) .npy array, or "
                              "(batch, length) when d_input is 1 (float32, float64 or int16); "
                              "options in the query"}},
    }},
    "parameters": [
        {"name": n, "in": "query", "required": False, "schema": schema,
         "description": "with an .npy body"}
        for n, schema in (("sample_rate", {"type": "number"}),
                          ("outputs", {"type": "string", "enum": ["all", "last"]}),
                          ("return_state", {"type": "boolean"}))
    ],
    "responses": {
        "200": {"description": "outputs (JSON, or .npy with Accept: application/x-npy)",
                "content": {JSON_TYPE: {"schema": {"type": "object"}},
                            NPY_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
        **{str(status): {"description": why, "content": {JSON_TYPE: {"schema": _ERROR}}}
           for status, why in ((400, "bad input"), (401, "no or wrong key"),
                               (404, "no such model"),
                               (408, "no bytes of the body for body_timeout seconds"),
                               (413, "too large"),
                               (415, "unsupported media type"), (422, "schema mismatch"),
                               (503, "overloaded or not ready"), (504, "timeout"))},
    },
}


@router.post("/v1/models/{name}/predict", openapi_extra=_PREDICT_DOC)
async def predict(name: str, request: Request) -> Response:
    started = time.perf_counter()
    rt = _runtime(request)
    outcome = "error"
    label = name if name in rt.models else None
    counted = False
    try:
        rt = _authorize(request)
        if not rt.ready or rt.draining:
            raise ServeError("overloaded", "server is not ready")
        model = rt.model(name)
        # counted from before its body is read until its answer is sent: uploads and answers
        # in flight hold memory of the server process too
        if rt.pending_requests >= rt.settings.max_pending_requests:
            raise ServeError("overloaded", "too many predict requests waiting; try again later")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ServeError("unsupported_media_type", f"Content-Encoding {encoding!r} is not "
                             "supported: send the body uncompressed")
        rt.pending_requests += 1
        counted = True
        body = await _read_body(request, rt.settings.max_body_bytes, rt.settings.body_timeout)
        media = request.headers.get("content-type", JSON_TYPE).split(";")[0].strip().lower()
        job = Job(name, body, media, dict(request.query_params),
                  NPY_TYPE in request.headers.get("accept", ""))
        answer = await _answer(rt, job)
        if answer.status != 200:
            rt.error(answer.code or "internal")
            return Response(answer.body, answer.status, media_type=JSON_TYPE)
        info = model.info
        rt.metrics.conv_seconds.labels(info.name).observe(answer.seconds)
        rt.metrics.samples.labels(info.name, "batch").inc(answer.samples)
        outcome = "ok"
        counted = False  # the response gives the count back once sent
        device = {"x-device": info.device} if answer.media == NPY_TYPE else None
        return _Counted(rt, answer.body, media_type=answer.media, headers=device)
    finally:
        if counted:
            rt.pending_requests -= 1
        if label is not None:
            rt.metrics.requests.labels(label, outcome).inc()
            rt.metrics.predict_latency.labels(label).observe(time.perf_counter() - started)


class _Counted(Response):
    """An answer that holds its request's place among the pending ones until it is sent (or
    its client has gone)."""

    def __init__(self, rt: Runtime, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rt = rt

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._rt.pending_requests -= 1


async def _answer(rt: Runtime, job: Job) -> Answer:
    """In a predict worker process, or (predict_workers = 0) in the server's predict thread."""
    if rt.predict_pool is not None:
        return await rt.predict_pool.run(job)
    backends = {name: m.backend for name, m in rt.models.items()}
    limits = Limits.of(rt.settings)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(rt.predict_executor, _run_job, backends, limits, job)


def _run_job(backends: dict, limits: Limits, job: Job) -> Answer:
    before = rss_bytes()
    answer = run_job(backends, limits, job)
    trim(before + limits.memory_bytes)  # as a predict worker does (server/heap.py)
    return answer


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError("too_large", f"body over the limit of {limit} bytes")
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    try:
        # a deadline for the next bytes, not for the whole body: a slow link is not a stall
        async with asyncio.timeout(loop.time() + timeout) as deadline:
            async for chunk in request.stream():  # counted as it arrives, whatever it declared
                deadline.reschedule(loop.time() + timeout)
                size += len(chunk)
                if size > limit:
                    raise ServeError("too_large", f"body over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ServeError("body_timeout", f"no bytes of the body came for {timeout:g} s "
                         f"({size} bytes before)") from None
    return b"".join(chunks)
