"""A model-free server with the s4serve protocol's wire shape (docs/protocol.md): the
transport ceiling for load tests.

Same stack as the real server (FastAPI + uvicorn), same messages (start/started, one reply
per frame, end), but the "model" is the identity: every reply carries the frame's samples as
float32 (d_output = d_input). The predict endpoint answers the same identity, so the load
test's value check runs against it too. `fault` injects protocol errors for the client's tests.
"""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest

ECHO_MODEL = "echo"
FAULTS = ("drop", "duplicate", "corrupt", "error", "swap")


def _model_info(name: str, channels: int, sample_rate: float) -> dict:
    return {
        "name": name,
        "version": "1",
        "layer": "none",
        "task": "sequence",
        "d_input": channels,
        "d_output": channels,
        "labels": None,
        "sample_rate": sample_rate,
        "n_layers": 0,
        "d_model": 0,
        "d_state": 0,
        "state_bytes": 0,
        "device": "cpu",
        "backend": "echo",
    }


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def parse_fault(fault: str | None) -> tuple[str, int] | None:
    """'drop:7' -> every 7th frame's reply is dropped (likewise duplicate/corrupt/error/swap)."""
    if not fault:
        return None
    kind, _, every = fault.partition(":")
    if kind not in FAULTS or not every.isdigit() or int(every) < 1:
        raise ValueError(f"fault must be one of {FAULTS} as KIND:N, got {fault!r}")
    return kind, int(every)


def create_echo_app(
    channels: int = 1, sample_rate: float = 100.0, fault: str | None = None
) -> FastAPI:
    """The echo app for `channels` input channels, optionally misbehaving every N frames."""
    app = FastAPI(title="s4serve echo (transport ceiling)")
    injected = parse_fault(fault)
    registry = CollectorRegistry()
    frames = Counter("echo_frames", "frames echoed", registry=registry)
    info = _model_info(ECHO_MODEL, channels, sample_rate)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready", "models": [ECHO_MODEL]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode())

    @app.get("/v1/models")
    async def models() -> dict:
        return {"models": [info]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> Response:
        if name != ECHO_MODEL:
            return _error(404, "model_not_found", f"no model named {name!r}")
        return JSONResponse(info)

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request) -> Response:
        if name != ECHO_MODEL:
            return _error(404, "model_not_found", f"no model named {name!r}")
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/x-npy"):
            inputs = np.load(io.BytesIO(body), allow_pickle=False)
            inputs = inputs.astype(np.float32) / 32768 if inputs.dtype == np.int16 else inputs
        else:
            inputs = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
        outputs = inputs.astype(np.float32).reshape(inputs.shape[0], inputs.shape[1], channels)
        if "application/x-npy" in request.headers.get("accept", ""):
            buf = io.BytesIO()
            np.save(buf, outputs)
            return Response(buf.getvalue(), media_type="application/x-npy")
        return JSONResponse({"model": ECHO_MODEL, "version": "1", "outputs": outputs.tolist()})

    @app.websocket("/v1/models/{name}/stream")
    async def stream(ws: WebSocket, name: str) -> None:
        await ws.accept()
        if name != ECHO_MODEL:
            await ws.close(1008, "model_not_found")
            return
        try:
            await _echo_session(ws, channels, sample_rate, injected, frames)
        except WebSocketDisconnect:
            return

    return app


async def _echo_session(
    ws: WebSocket, channels: int, rate: float, fault: tuple[str, int] | None, frames: Counter
) -> None:
    start = json.loads(await ws.receive_text())
    dtype = np.dtype("<i2" if start.get("dtype") == "int16" else "<f4")
    await ws.send_text(
        json.dumps(
            {
                "type": "started",
                "session": "echo",
                "resume_token": "none",
                "model": ECHO_MODEL,
                "version": "1",
                "d_input": channels,
                "d_output": channels,
                "dtype": dtype.name,
                "sample_rate": start.get("sample_rate", rate),
                "labels": None,
                "samples": 0,
            }
        )
    )
    samples = 0
    for seq in itertools.count():
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        faulty = fault is not None and seq % fault[1] == fault[1] - 1
        if msg.get("bytes") is not None:
            data = np.frombuffer(msg["bytes"], dtype=dtype)
            out = (data.astype(np.float32) / 32768) if dtype.kind == "i" else data
            reply: bytes | str = out.astype("<f4").tobytes()
            rows = len(data) // channels
        else:
            body = json.loads(msg["text"])
            if body.get("type") == "end":
                await ws.send_text(json.dumps({"type": "end", "samples": samples}))
                await ws.close(1000)
                return
            rows = len(body["data"])
            reply = json.dumps({"type": "outputs", "seq": seq, "t": samples, "data": body["data"]})
        frames.inc()
        if faulty:
            await _misbehave(ws, fault[0], reply, seq)
            if fault[0] != "error":
                samples += rows
            continue
        samples += rows
        await (ws.send_bytes(reply) if isinstance(reply, bytes) else ws.send_text(reply))


async def _misbehave(ws: WebSocket, kind: str, reply: bytes | str, seq: int) -> None:
    send = ws.send_bytes if isinstance(reply, bytes) else ws.send_text
    if kind == "drop":
        return
    if kind == "duplicate":
        await send(reply)
        await send(reply)
    elif kind == "corrupt":
        await send(reply[:-1] if reply[:-1] else b"\0")
    elif kind == "error":
        await ws.send_text(json.dumps({"type": "error", "code": "injected", "message": "test"}))
    elif kind == "swap" and isinstance(reply, bytes):
        await send((np.frombuffer(reply, dtype="<f4") + 1.0).astype("<f4").tobytes())
    else:  # swap on JSON: answer with the wrong seq
        body = json.loads(reply)
        body["seq"] = seq + 1
        await send(json.dumps(body))


def _echo_worker(host: str, port: int, channels: int, sample_rate: float,
                 fault: str | None) -> None:
    import uvicorn

    from server.workers import bind_shared

    # the same transport settings as s4serve's (server/app.py): sans-I/O websockets, no deflate
    config = uvicorn.Config(create_echo_app(channels, sample_rate, fault), log_level="warning",
                            ws="websockets-sansio", ws_per_message_deflate=False)
    uvicorn.Server(config).run(sockets=[bind_shared(host, port)])


def serve_echo(host: str, port: int, channels: int, sample_rate: float, fault: str | None,
               workers: int = 1) -> None:
    """Run the echo app: one process, or `workers` processes sharing the port (SO_REUSEPORT),
    so that it is compared with `s4serve serve --workers N` at the same N."""
    import multiprocessing
    import signal
    import sys

    if workers == 1:
        _echo_worker(host, port, channels, sample_rate, fault)
        return
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_echo_worker, args=(host, port, channels, sample_rate, fault))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` stops them
    try:
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            proc.terminate()
