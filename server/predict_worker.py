"""Predict requests in worker processes (`predict_workers`, default 1).

Parsing the body, the convolutional view and encoding the answer run in a process of their own,
so neither a large JSON body (json.loads holds the GIL for the whole parse) nor a long
computation can stall the event loop that steps the streams. A request that computes longer
than `predict_timeout` seconds is cut off: its worker is killed and replaced, the client gets
504 `timeout`, and a worker that dies (out of memory, say) costs only its own request (500).

Requests and answers cross a pipe as two messages each: a JSON header, then the body's bytes,
sent from the worker's own buffer and never joined into one (an answer of B=64 × L=16000 × 10
outputs is 41 MB: each copy of it took 20-25 ms); an answer of a megabyte or more goes in a
memory file instead (server/answer_file.py). Nothing is pickled. With
`predict_workers = 0` the same job (server/predict_job.py) runs in a thread of the server
process, with no time limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path

from server import answer_file
from server.errors import ServeError
from server.heap import fix_heap, rss_bytes, trim, without_mkl_buffers
from server.predict_job import Answer, Job, Limits, run_job

log = logging.getLogger("s4serve.predict")
_START_TIMEOUT_S = 600.0  # loading torch and the models, on a slow machine
_MIN_WAIT_S = 60.0  # the least a request waits for a free worker (a replacement starting)


def _send(conn: Connection, header: dict, body: bytes | memoryview | None = None) -> None:
    conn.send_bytes(json.dumps(header).encode())
    if body is not None:
        conn.send_bytes(body)


def _receive(conn: Connection, body: bool = True) -> tuple[dict, bytes | memoryview]:
    header = json.loads(conn.recv_bytes())
    if "file" in header:  # a large answer, in a memory file (server/answer_file.py)
        return header, answer_file.receive(conn, header.pop("file"))
    return header, conn.recv_bytes() if body else b""


def _worker_main(conn: Connection, model_dirs: list[str], device: str, max_rates: int,
                 limits: dict, torch_threads: int, nice: int, server_pid: int) -> None:
    """A worker process: load the models for predict, then answer jobs until the pipe closes
    or the server process is gone."""
    import torch

    from server.lifeline import die_with_parent

    die_with_parent(server_pid, signal.SIGKILL)  # nothing of its own to save
    os.nice(nice)  # a long request must not take the cores from the streams' steps
    from server.backends.base import load_backend

    if torch_threads:
        torch.set_num_threads(torch_threads)
    rules = Limits(**limits)
    fix_heap(rules.memory_bytes)  # peak memory bounded by predict_memory_mb, run after run
    backends = {}
    for model_dir in model_dirs:  # the torch backend's convolutional view serves predict
        backend = load_backend("torch", Path(model_dir), device, max_rates, "torchscript")
        backends[backend.info.name] = backend
    ceiling = rss_bytes() + rules.memory_bytes  # held past this after a job: given back
    shared = answer_file.AnswerFile()
    _send(conn, {"ready": sorted(backends)})
    while True:
        try:
            header, body = _receive(conn)
        except (EOFError, OSError):
            return
        try:
            answer = run_job(backends, rules, Job(body=body, **header), shared.allocate)
        except Exception as exc:  # a bug, not the client's mistake: say so, keep serving
            log.exception("predict job failed")
            error = ServeError("internal", f"internal error: {type(exc).__name__}")
            answer = Answer(500, "application/json", json.dumps(error.body()).encode(),
                            code="internal")
        if shared.holds(answer.body):
            _send(conn, {**answer.header(), "file": answer.body.nbytes})
            shared.send(conn, server_pid)
        else:
            shared.close()
            _send(conn, answer.header(), answer.body)
        del answer
        trim(ceiling)


class _Worker:
    def __init__(self, context, args: tuple) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, *args), daemon=True,
                                       name="s4serve-predict")
        self.process.start()
        child.close()

    def call(self, header: dict, body: bytes) -> tuple[dict, bytes | memoryview]:
        _send(self.conn, header, body)
        return _receive(self.conn)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class PredictPool:
    """`predict_workers` processes, one request each at a time; the rest wait their turn."""

    def __init__(self, model_dirs: list[Path], device: str, max_rates: int, limits: Limits,
                 size: int, timeout: float, torch_threads: int = 1, nice: int = 0) -> None:
        self._args = ([str(d) for d in model_dirs], device, max_rates, asdict(limits),
                      torch_threads, nice, os.getpid())
        self.size, self.timeout = size, timeout
        self._context = multiprocessing.get_context("spawn")
        without_mkl_buffers()  # in the workers' environment when MKL loads there
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._renewing: set[asyncio.Task] = set()
        self.restarts = 0

    async def start(self) -> None:
        """Start every worker and wait until each has loaded its models."""
        await asyncio.gather(*(self._add() for _ in range(self.size)))

    async def _add(self) -> None:
        worker = _Worker(self._context, self._args)
        self._workers.add(worker)
        try:
            header, _ = await asyncio.wait_for(
                asyncio.to_thread(_receive, worker.conn, False), _START_TIMEOUT_S)
        except (EOFError, OSError, TimeoutError) as exc:
            self._drop(worker)
            raise RuntimeError(f"a predict worker did not start: {exc!r}") from None
        log.debug("predict worker %d ready: %s", worker.process.pid, header["ready"])
        self._idle.put_nowait(worker)

    def _drop(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        worker.kill()

    async def run(self, job: Job) -> Answer:
        # a bounded wait (for the requests ahead and a worker being replaced): should no
        # worker ever come back, no request waits for good
        wait = max(2 * self.timeout, _MIN_WAIT_S)
        try:
            worker = await asyncio.wait_for(self._idle.get(), wait)
        except TimeoutError:
            raise ServeError("overloaded", f"no predict worker was free within {wait:g} s; "
                             "try again later") from None
        request = {"model": job.model, "media": job.media, "query": job.query, "npy": job.npy}
        try:
            header, body = await asyncio.wait_for(
                asyncio.to_thread(worker.call, request, job.body), self.timeout)
        except TimeoutError:
            self._replace(worker, "ran past predict_timeout")
            raise ServeError("timeout", f"predict took longer than {self.timeout:g} s; its "
                             "worker was stopped (send less per request)") from None
        except (EOFError, OSError):
            self._replace(worker, "died")
            raise ServeError("internal", "the predict worker died during this request") \
                from None
        except asyncio.CancelledError:  # its answer would arrive for nobody
            self._replace(worker, "lost its request")
            raise
        self._idle.put_nowait(worker)
        return Answer(header["status"], header["media"], body, header["seconds"],
                      header["samples"], header["code"])

    def _replace(self, worker: _Worker, why: str) -> None:
        log.warning("predict worker %d %s: replacing it", worker.process.pid, why)
        self._workers.discard(worker)
        self.restarts += 1
        task = asyncio.ensure_future(self._renew(worker))
        self._renewing.add(task)
        task.add_done_callback(self._renewing.discard)

    async def _renew(self, worker: _Worker) -> None:
        """Stop the worker off the event loop (killing and joining one took ~0.2 s, a pause
        of every stream), then start another, retrying until one starts."""
        await asyncio.to_thread(worker.kill)
        delay = 1.0
        while True:
            try:
                await self._add()
                return
            except RuntimeError as exc:
                log.error("no new predict worker (%s): trying again in %g s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)

    def stop(self) -> None:
        for task in list(self._renewing):
            task.cancel()
        for worker in list(self._workers):
            self._drop(worker)
