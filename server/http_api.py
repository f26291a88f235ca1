"""The HTTP endpoints: health, readiness, metrics, model listing and batch predict."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import ServeError
from server.models import LoadedModel
from server.predict_io import (
    NPY_TYPE,
    PredictRequest,
    SchemaError,
    npy_bytes,
    parse_json,
    parse_npy,
)
from server.runtime import Runtime
from server.state_blob import StateRecord, decode_state, encode_state

log = logging.getLogger("s4serve.http")
router = APIRouter()


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _authorize(request: Request) -> Runtime:
    rt = _runtime(request)
    if not rt.guard.key_ok(request.headers):
        raise ServeError("unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")
    return rt


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    rt = _runtime(request)
    if rt.all_ready():
        return JSONResponse({"status": "ready", "models": sorted(rt.models)})
    status = "draining" if rt.draining else ("failed" if rt.load_error else "loading")
    message = rt.load_error or f"server is {status}"
    return JSONResponse(
        {"status": status, "error": {"code": "not_ready", "message": message}}, status_code=503
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_runtime(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    rt = _authorize(request)
    return {"models": [m.info.as_dict() for m in rt.models.values()]}


@router.get("/v1/models/{name}")
async def get_model(name: str, request: Request) -> dict:
    return _authorize(request).model(name).info.as_dict()


@router.post("/v1/models/{name}/predict")
async def predict(name: str, request: Request) -> Response:
    started = time.perf_counter()
    rt = _runtime(request)
    outcome = "error"
    label = name if name in rt.models else None
    try:
        rt = _authorize(request)
        if not rt.ready or rt.draining:
            raise ServeError("overloaded", "server is not ready")
        model = rt.model(name)
        body = await _read_body(request, rt.settings.max_body_bytes)
        parsed = _parse(request, body, model)
        if parsed.return_state and _wants_npy(request):
            raise ServeError("bad_request", "return_state needs a JSON answer (drop Accept npy)")
        response = await _run_predict(rt, model, parsed, _wants_npy(request))
        outcome = "ok"
        return response
    except SchemaError as exc:
        rt.error("invalid_request")
        return JSONResponse(
            {"error": {"code": "invalid_request", "message": str(exc)}, "detail": exc.errors},
            status_code=422,
        )
    finally:
        if label is not None:
            rt.metrics.requests.labels(label, outcome).inc()
            rt.metrics.predict_latency.labels(label).observe(time.perf_counter() - started)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError("too_large", f"body over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives, whatever the header said
        size += len(chunk)
        if size > limit:
            raise ServeError("too_large", f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(request: Request, body: bytes, model: LoadedModel) -> PredictRequest:
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    d_input = model.info.d_input
    if media == NPY_TYPE:
        return parse_npy(body, dict(request.query_params), d_input)
    if media in ("application/json", ""):
        return parse_json(body, d_input)
    raise ServeError("unsupported_media_type", f"send application/json or {NPY_TYPE}")


def _wants_npy(request: Request) -> bool:
    return NPY_TYPE in request.headers.get("accept", "")


def _start_states(model: LoadedModel, blobs: list[str] | None, batch: int):
    """Stack per-sequence blobs into batch state tensors; also their sample counts."""
    if blobs is None:
        return None, [0] * batch
    if len(blobs) != batch:
        raise ServeError("bad_state", f"state needs one blob per sequence ({batch})")
    info, backend = model.info, model.backend
    records = [decode_state(blob) for blob in blobs]
    for record in records:
        record.check(info.name, info.version, backend.state_spec)
    state = [
        torch.from_numpy(np.stack([r.tensors[i] for r in records])).to(backend.device)
        for i in range(len(backend.state_spec))
    ]
    return state, [r.samples for r in records]


async def _run_predict(rt: Runtime, model: LoadedModel, req: PredictRequest, npy: bool):
    batch, length, _ = req.inputs.shape
    limit = rt.settings.max_batch_length
    if batch * length > limit:
        raise ServeError("too_large", f"batch × length {batch * length} is over the limit {limit}")
    backend = model.backend
    rate = backend.rate_for(req.sample_rate)
    state, samples = _start_states(model, req.state, batch)
    if rt.pending_requests >= rt.settings.max_pending_requests:
        raise ServeError("overloaded", "too many predict requests waiting; try again later")
    u = torch.from_numpy(req.inputs).to(backend.device)

    def compute():
        began = time.perf_counter()
        y, end_state = backend.predict(u, rate, state=state, return_state=req.return_state)
        if req.outputs == "last":
            y = y[:, -1:]
        y = y.to("cpu", torch.float32).numpy()
        cpu_state = None if end_state is None else [t.to("cpu").numpy() for t in end_state]
        return y, cpu_state, time.perf_counter() - began

    rt.pending_requests += 1
    try:
        loop = asyncio.get_running_loop()
        y, end_state, seconds = await loop.run_in_executor(rt.predict_executor, compute)
    finally:
        rt.pending_requests -= 1
    if not np.isfinite(y).all() or (end_state is not None and not all(
            np.isfinite(t).all() for t in end_state)):
        # finite inputs near float32's limit can overflow inside the network
        raise ServeError("non_finite", "the outputs would not be finite (inputs too large?)")
    info = model.info
    rt.metrics.conv_seconds.labels(info.name).observe(seconds)
    rt.metrics.samples.labels(info.name, "batch").inc(batch * length)
    if npy:
        return Response(npy_bytes(y), media_type=NPY_TYPE)
    blobs = None
    if req.return_state and end_state is not None:
        names = [s.name for s in backend.state_spec]
        blobs = [
            encode_state(StateRecord(
                info.name, info.version, samples[b] + length, [t[b] for t in end_state], names,
                req.sample_rate or info.sample_rate,
            ))
            for b in range(batch)
        ]
    return JSONResponse({
        "model": info.name, "version": info.version, "outputs": y.tolist(),
        "labels": info.labels, "state": blobs, "device": info.device,
        "timing_ms": {"compute": round(seconds * 1000, 3)},
    })
