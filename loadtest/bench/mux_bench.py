"""The mux under load: the server's CPU per session-sample, over the steady part of the hold
and over the whole run, against the served step timed in this process."""

from __future__ import annotations

import itertools
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest.bench.proc_stats import cpu_seconds
from loadtest.bench.timing import inner_for, time_call
from loadtest.mux_load import MuxLoadConfig, run_mux_load
from loadtest.processes import ServerProcess
from loadtest.stream_load import run_loop


def _step_per_session(model_dir: Path, batches: tuple[int, ...], sessions: int = 0,
                      gap_s: float = 0.0, paced_calls: int = 300) -> list[float]:
    """Seconds per session of the served batched step, in this process, at each batch size
    (one backend, loaded and compiled once), on the same rows every call; then, with
    `sessions`, at the first batch size cycling over the rows of that many sessions, as a
    server holding them does (their states need not stay in the core's caches: motion in one
    process, 1000 sessions in sets of 100 took 1.3x the time of the same 100 rows, 500
    sessions 1.0-1.3x); and, with `gap_s` too, the same cycling with `gap_s` of idle before
    each call (the median of its CPU time), as a worker's messages arrive: on this VM the same
    mux path cost 485 µs per message back to back and 762 / 898 / 1234 µs after 0.5 / 2 / 8 ms
    of idle (BENCHMARKS.md, session 15): a core that waited runs cold."""
    import torch

    from server.backends.torch import TorchBackend

    torch.set_num_threads(1)
    backend = TorchBackend(model_dir, device="cpu")
    backend.warmup()
    runs = [(batch, 1) for batch in batches]
    if sessions:
        runs.append((batches[0], max(1, -(-sessions // batches[0]))))
    seconds = []
    for batch, sets in runs:
        rows = itertools.cycle([backend.layout.join(backend.initial_state(batch))
                                for _ in range(sets)])
        u = torch.zeros(batch, backend.info.d_input)

        def call(rows=rows, u=u) -> None:
            backend.step_flat(u, *next(rows), 1.0)

        call()
        seconds.append(time_call(call, 5, inner_for(0.2, call)).median_s / batch)
    if sessions and gap_s:  # `call` and `batch` are the cycling run's
        taken = []
        for _ in range(paced_calls):
            time.sleep(gap_s)
            began = time.thread_time()
            call()
            taken.append(time.thread_time() - began)
        seconds.append(float(np.median(taken)) / batch)
    return seconds


class CpuTrace:
    """The server's CPU seconds (all workers) sampled every `period_s` from a thread, so that
    the CPU of any stretch of a run can be read afterwards."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.pid, self.period_s = pid, period_s
        self.points: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> CpuTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.points.append((time.perf_counter(), cpu_seconds(self.pid)))
            if self._stop.wait(self.period_s):
                return

    def between(self, a: float, b: float) -> float:
        """CPU seconds from perf_counter time a to b (interpolated between samples)."""
        times, cpu = zip(*self.points, strict=True)
        return float(np.interp(b, times, cpu) - np.interp(a, times, cpu))


_MAX_LAG_S = 0.1  # a window's edges then move by at most this, ~1% of an 8.5 s window


def steady_window(cfg: MuxLoadConfig, start: float) -> tuple[float, float, int]:
    """The steady part of a mux run, (from, to, session-samples due in it): the hold less its
    first second (routes and caches being set up) and its last half second."""
    a, b = start + 1.0, start + cfg.hold_s - 0.5
    due = np.add.outer(np.arange(cfg.gateways) / cfg.gateways,
                       np.arange(int(cfg.hold_s * cfg.rate))) / cfg.rate + start
    return a, b, int(((due >= a) & (due < b)).sum()) * cfg.sessions_per_gateway * cfg.frame


def run_mux(server: ServerProcess, model_dir: Path, gateways: int, per: int, hold_s: float,
         workers: int) -> dict:
    """The mux load against the server; its CPU per session-sample over the steady part of
    the hold (the streaming itself) and over the whole run (opening and closing the sessions
    included), against the in-process step."""
    cfg = MuxLoadConfig(url=server.url, model="motion", gateways=gateways,
                        sessions_per_gateway=per, rate=100.0, hold_s=hold_s)
    before, batches_before = cpu_seconds(server.pid), _batch_totals(server.url)
    with CpuTrace(server.pid) as trace:
        result = run_loop(run_mux_load(cfg))
    whole = cpu_seconds(server.pid) - before
    rows, calls, stepping = (a - b for a, b in zip(_batch_totals(server.url), batches_before,
                                                   strict=True))
    samples = result.counts["messages_answered"] * per
    a, b, steady_samples = steady_window(cfg, result.schedule_start)
    # the samples due in the window are those sent in it while the load generator kept to
    # its schedule; a run too short for a steady part, one that fell behind or lost
    # messages: the whole run's figure
    steady = (steady_samples > 0 and result.counts["lost"] == 0
              and result.max_send_lag_s <= _MAX_LAG_S)
    per_sample = (trace.between(a, b) / steady_samples if steady
                  else whole / max(samples, 1))
    served = max(1, round(rows / max(calls, 1)))  # mean sessions per step call, as served
    batch = max(1, gateways * per // workers)  # every session of a worker in one call
    gap = workers / max(1.0, result.throughput["messages_per_s"])  # between a worker's messages
    step, step_all, cycled, paced = _step_per_session(model_dir, (served, batch), batch, gap)
    return {"gateways": gateways, "sessions_per_gateway": per, "ok": result.ok,
            "failures": result.failures, "counts": result.counts,
            "latency_ms": result.latency_ms, "throughput": result.throughput,
            "verify": result.verify, "max_send_lag_s": result.max_send_lag_s,
            "server_cpu_s": whole,
            "server_cpu_per_session_sample_s": per_sample,
            "cpu_window_s": [a - result.schedule_start, b - result.schedule_start] if steady
            else None,
            "server_cpu_per_session_sample_whole_run_s": whole / max(samples, 1),
            "step_per_session_s": step, "step_batch": served,
            "cost_vs_step": per_sample / step,
            "step_cycled_per_session_s": cycled, "cycled_sessions": batch,
            "cost_vs_step_cycled": per_sample / cycled,
            "step_paced_per_session_s": paced, "paced_gap_s": gap,
            "cost_vs_step_paced": per_sample / paced,
            "step_all_per_session_s": step_all, "step_all_batch": batch,
            "cost_vs_step_all": per_sample / step_all,
            # the served step as timed inside the server (its step histogram): the rest of
            # the CPU per session-sample is the transport, parsing, replies and metrics
            "step_in_server_per_session_s": stepping / max(rows, 1)}


def _batch_totals(url: str) -> tuple[float, float, float]:
    """(sessions advanced, batched calls, seconds in those calls) so far, from /metrics, all
    workers."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return tuple(sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))
                 for name in ("s4serve_step_batch_size_sum", "s4serve_step_batch_size_count",
                              "s4serve_step_seconds_sum"))
