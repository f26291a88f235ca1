"""One predict request from body bytes to answer bytes, with no server state: the same code runs
in a predict worker process (server/predict_worker.py) and, with `predict_workers = 0`, in a
thread of the server."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from server.backends.base import ModelBackend, refuse_unstreamable
from server.errors import ServeError
from server.predict_io import (
    NPY_TYPE,
    PredictRequest,
    SchemaError,
    npy_bytes,
    npy_file,
    parse_json,
    parse_npy,
)
from server.state_blob import StateRecord, decode_state, encode_state
from server.workers import cpu_cores

JSON_TYPE = "application/json"
_MIN_TIME_BLOCK = 1024  # samples: shorter blocks only add calls


@dataclass
class Job:
    model: str
    body: bytes
    media: str  # the request's content type, lower case, no parameters
    query: dict[str, str] = field(default_factory=dict)
    npy: bool = False  # the client accepts an .npy answer


@dataclass
class Limits:
    max_batch_length: int
    state_secret: str | None = None
    memory_bytes: int = 256 << 20  # conv passes in flight together (predict_memory_mb)
    max_json_values: int = 16_000_000  # numbers in a JSON answer's outputs
    threads: int = 1  # conv passes of one request run side by side (predict_threads)
    pass_bytes: int = 32 << 20  # a conv pass's working set (predict_pass_mb)

    @classmethod
    def of(cls, settings) -> Limits:
        workers = max(1, settings.predict_workers)
        threads = settings.predict_threads or max(1, cpu_cores() // workers)
        return cls(settings.max_batch_length, settings.secret, settings.predict_memory_mb << 20,
                   settings.max_json_values, threads, settings.predict_pass_mb << 20)

    def pass_size(self, per_sequence: int) -> int | None:
        """Sequences per conv pass: the passes in flight within `memory_bytes` together, and
        each near `pass_bytes` (a pass that outgrows the caches runs slower per sequence: up to
        2x at B=64 x L=16000 in passes of 10 against 1); None: the batch whole (the backend
        cannot say)."""
        if not per_sequence:
            return None
        return max(1, min(self.memory_bytes // self.threads, self.pass_bytes) // per_sequence)


@functools.cache
def _passes_pool(threads: int) -> ThreadPoolExecutor | None:
    """This process's threads for conv passes, kept so their buffers are reused."""
    return ThreadPoolExecutor(threads, "s4serve-pass") if threads > 1 else None


@dataclass
class Answer:
    status: int
    media: str
    body: bytes | memoryview
    seconds: float = 0.0  # compute time
    samples: int = 0  # input samples processed
    code: str | None = None  # the error code, when status != 200

    def header(self) -> dict:
        return {"status": self.status, "media": self.media, "seconds": self.seconds,
                "samples": self.samples, "code": self.code}


def run_job(backends: dict[str, ModelBackend], limits: Limits, job: Job,
            allocate: Callable[[int], np.ndarray] | None = None) -> Answer:
    """The answer to one request, errors included (never raises for a client's mistake).
    `allocate(n)`: where an .npy answer's n bytes are written (a worker's memory file)."""
    try:
        backend = backends.get(job.model)
        if backend is None:
            raise ServeError("model_not_found", f"no model named {job.model!r}")
        request = _parse(job, backend.info.d_input, limits.max_batch_length)
        if request.return_state and job.npy:
            raise ServeError("bad_request", "return_state needs a JSON answer (drop Accept npy)")
        return _predict(backend, limits, request, job.npy, allocate)
    except SchemaError as exc:
        body = {"error": {"code": "invalid_request", "message": str(exc)}, "detail": exc.errors}
        return Answer(422, JSON_TYPE, json.dumps(body, allow_nan=False, default=str).encode(),
                      code="invalid_request")
    except ServeError as exc:
        return Answer(exc.http_status, JSON_TYPE, json.dumps(exc.body()).encode(),
                      code=exc.code)


def _parse(job: Job, d_input: int, max_steps: int) -> PredictRequest:
    if job.media == NPY_TYPE:
        return parse_npy(job.body, job.query, d_input, max_steps)
    if job.media in (JSON_TYPE, ""):
        return parse_json(job.body, d_input, max_steps)
    raise ServeError("unsupported_media_type", f"send {JSON_TYPE} or {NPY_TYPE}")


def _start_states(backend: ModelBackend, blobs: list[str] | None, batch: int,
                  secret: str | None):
    """Stack per-sequence blobs into batch state tensors; also their sample counts."""
    if blobs is None:
        return None, [0] * batch
    if len(blobs) != batch:
        raise ServeError("bad_state", f"state needs one blob per sequence ({batch})")
    info = backend.info
    records = [decode_state(blob, secret) for blob in blobs]
    for record in records:
        record.check(info.name, info.version, backend.state_spec)
    state = [
        torch.from_numpy(np.stack([r.tensors[i] for r in records])).to(backend.device)
        for i in range(len(backend.state_spec))
    ]
    return state, [r.samples for r in records]


def _along_time(backend: ModelBackend, u: torch.Tensor, rate: float, block: int, last: bool,
                out: torch.Tensor | None) -> torch.Tensor:
    """Sequences whose conv view would need more than the memory bound, in blocks of `block`
    samples through the exact chunked recurrence: each block starts from the state the one
    before left (the outputs are the conv view's within float32 rounding), and the working
    set is a block's, whatever the length."""
    batch, length, _ = u.shape
    block = max(_MIN_TIME_BLOCK, block)
    if out is None:
        out = torch.empty(batch, 1 if last else length, backend.info.d_output)
    state = None
    for start in range(0, length, block):
        y, state = backend.predict(u[:, start:start + block], rate, state=state,
                                   return_state=True)  # (B, T, d_output)
        if not last:
            out[:, start:start + y.shape[1]] = y
        elif start + block >= length:
            out[:] = y[:, -1:]
    return out


def _predict(backend: ModelBackend, limits: Limits, req: PredictRequest, npy: bool,
             allocate: Callable[[int], np.ndarray] | None) -> Answer:
    batch, length, _ = req.inputs.shape
    if batch * length > limits.max_batch_length:
        raise ServeError("too_large", f"batch × length {batch * length} is over the limit "
                         f"{limits.max_batch_length}")
    values = batch * (1 if req.outputs == "last" else length) * backend.info.d_output
    if not npy and values > limits.max_json_values:  # ~20 bytes of JSON and 32 of list each
        raise ServeError("too_large", f"a JSON answer of {values} numbers is over the limit "
                         f"{limits.max_json_values}: ask for .npy (Accept: application/x-npy) "
                         "or outputs=last")
    rate = backend.rate_for(req.sample_rate)
    if req.state is not None or req.return_state:
        refuse_unstreamable(backend.info, "state in or out")
    state, samples = _start_states(backend, req.state, batch, limits.state_secret)
    began = time.perf_counter()
    u = torch.from_numpy(req.inputs)
    if backend.device.type == "cuda":  # page-locked, so the copy is one DMA, asynchronous
        u = u.pin_memory()
    u = u.to(backend.device, non_blocking=True)
    conv = state is None and not req.return_state  # the conv view (or along time), no state
    body = filled = None
    if npy and conv and backend.device.type == "cpu":
        # the answer's file first: the conv passes write their outputs into it, not copied after
        shape = (batch, 1 if req.outputs == "last" else length, backend.info.d_output)
        body, data = npy_file(shape, allocate)
        filled = torch.from_numpy(data)
    per_sequence = backend.conv_bytes(length)
    # on a GPU the passes queue on one stream anyway: threads would only contend for it
    pool = _passes_pool(limits.threads) if backend.device.type == "cpu" else None
    if conv and backend.info.streamable and per_sequence > limits.memory_bytes:
        block = limits.memory_bytes * length // (per_sequence * batch)
        y, end_state = _along_time(backend, u, rate, block, req.outputs == "last", filled), None
    else:
        y, end_state = backend.predict(u, rate, state=state, return_state=req.return_state,
                                       last=req.outputs == "last",
                                       max_batch=limits.pass_size(per_sequence),
                                       pool=pool, out=filled)
    if req.outputs == "last":
        y = y[:, -1:]
    y = y.to("cpu", torch.float32).numpy()
    end_state = None if end_state is None else [t.to("cpu").numpy() for t in end_state]
    seconds = time.perf_counter() - began
    if not np.isfinite(y).all() or (end_state is not None and not all(
            np.isfinite(t).all() for t in end_state)):
        # finite inputs near float32's limit can overflow inside the network
        raise ServeError("non_finite", "the outputs would not be finite (inputs too large?)")
    if npy:
        if filled is None or y.ctypes.data != filled.data_ptr():  # not written in place
            body = npy_bytes(y, allocate)
        return Answer(200, NPY_TYPE, body, seconds, batch * length)
    info = backend.info
    blobs = None
    if req.return_state and end_state is not None:
        names = [s.name for s in backend.state_spec]
        blobs = [
            encode_state(StateRecord(
                info.name, info.version, samples[b] + length, [t[b] for t in end_state], names,
                req.sample_rate or info.sample_rate,
            ), limits.state_secret)
            for b in range(batch)
        ]
    body = {
        "model": info.name, "version": info.version, "outputs": y.tolist(),
        "labels": info.labels, "state": blobs, "device": info.device,
        "timing_ms": {"compute": round(seconds * 1000, 3)},
    }
    text = json.dumps(body, allow_nan=False, separators=(",", ":"))
    return Answer(200, JSON_TYPE, text.encode(), seconds, batch * length)
