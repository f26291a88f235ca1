"""Server end to end: the load tester against s4serve and the echo app, side by side."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from websockets.asyncio.client import connect

from loadtest.bench.beside_predict import beside_predict
from loadtest.bench.k6_bench import run_k6
from loadtest.bench.networks import served_model
from loadtest.bench.profile import finish_profile, start_profile
from loadtest.bench.timing import inner_for, time_call
from loadtest.config import StreamLoadConfig
from loadtest.mux_load import MuxLoadConfig, run_mux_load
from loadtest.processes import ServerProcess
from loadtest.stream_load import StreamResult, run_loop, run_stream_load
from model.checkpoint import load_config
from server.workers import cpu_cores

AUDIO_P99_LIMIT_MS = 100.0


def _summary(result: StreamResult) -> dict:
    return {
        "ok": result.ok,
        "failures": result.failures,
        "throughput": {**result.throughput, "lost": result.counts.get("lost", 0)},
        "errors": result.errors,
        "latency_hold_ms": result.latency_hold_ms,
        "client_max_send_lag_ms": result.client["max_send_lag_ms"],
        "verify_max_abs_err": result.verify["max_abs_err"],
        "server": {k: result.server.get(k) for k in
                   ("step_batch_size", "step_seconds", "queue_depth_max", "frame_latency")},
    }  # fmt: skip


def _stream(url: str, model: str, sessions: int, hold_s: float, **kw) -> dict:
    cfg = StreamLoadConfig(
        url=url, model=model, sessions=sessions, ramp_s=max(0.5, sessions / 200), hold_s=hold_s,
        drain_s=15.0, verify_sessions=2, **kw,
    )  # fmt: skip
    return _summary(run_loop(run_stream_load(cfg)))


def run_server_benches(scratch: Path, quick: bool, log=print) -> dict:
    counts = (1, 10) if quick else (100, 300, 1000)
    profile_at = counts[1]
    ladder = (1, 2) if quick else (8, 16, 24, 32, 48, 64, 96, 128)
    hold_s = 1.0 if quick else 10.0
    audio_hold_s = 1.0 if quick else 5.0
    workers = 1 if quick else cpu_cores()
    motion_dir, motion_kind = served_model("motion", scratch)
    digits_dir, digits_kind = served_model("digits", scratch)
    results: dict = {"models": {"motion": motion_kind, "digits": digits_kind}, "sessions": {},
                     "workers": workers}
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    channels = load_config(motion_dir).d_input  # same bytes per frame as the model's stream
    # a fresh session store per run: records left by earlier runs on this disk would make
    # the janitor's purges (and file creation among many deleted files) part of the figures
    serve_workers = ["--workers", str(workers), "--snapshot-dir", str(scratch / "sessions")]
    with (
        ServerProcess.echo(channels=channels, workers=workers, log_path=logs / "echo.log") as echo,
        ServerProcess.s4serve([motion_dir], extra=serve_workers,
                              log_path=logs / "s4serve.log") as server,
    ):
        for n in counts:
            log(f"server bench: {n} sessions × 100 Hz per-sample frames (model, then echo)")
            clients = 2 if n >= 300 else 1  # load-generator processes
            profiling = n == profile_at
            if profiling:
                spy_out = scratch / "server-profile.txt"
                spy = start_profile(server.pid, max(0.5, n / 200) + hold_s, spy_out)
            model = _stream(server.url, "motion", n, hold_s, rate=100.0, frame=1,
                            workers=clients)
            if profiling:
                results["profile"] = {"sessions": n, **finish_profile(spy, spy_out)}
                log(f"server bench: k6 at {n} sessions")
                results["k6"] = run_k6(server.url, "motion", n, 100.0, hold_s, scratch)
            ceiling = _stream(echo.url, "echo", n, hold_s, rate=100.0, frame=1, workers=clients)
            ratio = model["throughput"]["frames_per_s"] / max(
                ceiling["throughput"]["frames_per_s"], 1e-9
            )
            results["sessions"][n] = {"model": model, "echo": ceiling, "model_vs_echo": ratio}
        gateways, per = (2, 5) if quick else (10, 100)
        log(f"server bench: mux, {gateways} gateways × {per} sessions × 100 Hz")
        results["mux"] = _mux(server, motion_dir, gateways, per, hold_s, workers)
        sessions = counts[0]
        log(f"server bench: {sessions} sessions × 100 Hz beside the largest JSON predict")
        results["beside_predict"] = beside_predict(
            server.url, "motion", channels,
            lambda seconds: _stream(server.url, "motion", sessions, seconds, rate=100.0,
                                    frame=1), quick)
        n = counts[-1]
        log(f"server bench: {n} sessions × 10 frames/s of 10 samples")
        results["chunked"] = {"sessions": n, "frame": 10, **_stream(
            server.url, "motion", n, hold_s, rate=100.0, frame=10, workers=2 if n >= 300 else 1)}

    drop_n = 10 if quick else 200
    with ServerProcess.s4serve([motion_dir], extra=serve_workers,
                               log_path=logs / "s4serve-drop.log") as server:
        log(f"server bench: time to idle after {drop_n} loaded sessions disconnect")
        results["drop"] = asyncio.run(idle_after_drop(server.url, "motion", drop_n))

    # A fresh server: an overloaded run above can leave a backlog that would pollute this one.
    with ServerProcess.s4serve([digits_dir], extra=serve_workers,
                               log_path=logs / "s4serve-audio.log") as server:
        results["audio"] = _audio_ladder(server.url, ladder, audio_hold_s, log)
    return results


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (all workers)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
        todo += [int(c) for c in children]
    return total


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


class _CpuTrace:
    """The server's CPU seconds (all workers) sampled every `period_s` from a thread, so that
    the CPU of any stretch of a run can be read afterwards."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.pid, self.period_s = pid, period_s
        self.points: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _CpuTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.points.append((time.perf_counter(), _cpu_seconds(self.pid)))
            if self._stop.wait(self.period_s):
                return

    def between(self, a: float, b: float) -> float:
        """CPU seconds from perf_counter time a to b (interpolated between samples)."""
        times, cpu = zip(*self.points, strict=True)
        return float(np.interp(b, times, cpu) - np.interp(a, times, cpu))


_MAX_LAG_S = 0.1  # a window's edges then move by at most this, ~1% of an 8.5 s window


def _steady_window(cfg: MuxLoadConfig, start: float) -> tuple[float, float, int]:
    """The steady part of a mux run, (from, to, session-samples due in it): the hold less its
    first second (routes and caches being set up) and its last half second."""
    a, b = start + 1.0, start + cfg.hold_s - 0.5
    due = np.add.outer(np.arange(cfg.gateways) / cfg.gateways,
                       np.arange(int(cfg.hold_s * cfg.rate))) / cfg.rate + start
    return a, b, int(((due >= a) & (due < b)).sum()) * cfg.sessions_per_gateway * cfg.frame


def _mux(server: ServerProcess, model_dir: Path, gateways: int, per: int, hold_s: float,
         workers: int) -> dict:
    """The mux load against the server; its CPU per session-sample over the steady part of
    the hold (the streaming itself) and over the whole run (opening and closing the sessions
    included), against the in-process step."""
    cfg = MuxLoadConfig(url=server.url, model="motion", gateways=gateways,
                        sessions_per_gateway=per, rate=100.0, hold_s=hold_s)
    before, batches_before = _cpu_seconds(server.pid), _batch_totals(server.url)
    with _CpuTrace(server.pid) as trace:
        result = run_loop(run_mux_load(cfg))
    whole = _cpu_seconds(server.pid) - before
    rows, calls, stepping = (a - b for a, b in zip(_batch_totals(server.url), batches_before,
                                                   strict=True))
    samples = result.counts["messages_answered"] * per
    a, b, steady_samples = _steady_window(cfg, result.schedule_start)
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


def _server_counts(url: str) -> tuple[float, float]:
    """(frames queued, batched calls so far) from /metrics, all models and workers."""
    text = httpx.get(url + "/metrics", timeout=10).text
    queued = sum(float(v) for v in re.findall(r"^s4serve_queue_depth\{[^}]*\} (\S+)$", text, re.M))
    calls = sum(float(v) for v in
                re.findall(r"^s4serve_step_seconds_count\{[^}]*\} (\S+)$", text, re.M))
    return queued, calls


async def idle_after_drop(url: str, model: str, sessions: int, frames: int = 32,
                          frame_len: int = 1000) -> dict:
    """`sessions` clients queue `frames` long frames each and vanish (TCP reset, no close);
    measured: the time until the server is idle (nothing queued, no more batched calls), and
    how many of `sessions` new clients then start at once."""
    ws_url = url.replace("http", "ws", 1) + f"/v1/models/{model}/stream"
    clients = [await connect(ws_url, max_size=None, ping_interval=None) for _ in range(sessions)]
    d_input = 1
    for ws in clients:
        await ws.send(json.dumps({"type": "start"}))
        d_input = json.loads(await ws.recv())["d_input"]
    frame = np.zeros((frame_len, d_input), "<f4").tobytes()
    for ws in clients:
        for _ in range(frames):
            await ws.send(frame)
    await asyncio.sleep(0.5)
    queued_before, _ = await asyncio.to_thread(_server_counts, url)
    dropped = time.perf_counter()
    for ws in clients:
        ws.transport.abort()
    idle_s, last, last_s = None, None, 0.0
    while time.perf_counter() - dropped < 30:
        queued, calls = await asyncio.to_thread(_server_counts, url)
        now_s = time.perf_counter() - dropped
        if queued == 0 and last is not None and calls == last:
            idle_s = last_s  # idle at the previous poll at the latest
            break
        last, last_s = calls, now_s
        await asyncio.sleep(0.05)

    async def fresh() -> bool:
        try:
            async with connect(ws_url, open_timeout=10) as ws:
                await ws.send(json.dumps({"type": "start"}))
                return json.loads(await ws.recv()).get("type") == "started"
        except Exception:
            return False

    started = time.perf_counter()
    ok = sum(await asyncio.gather(*(fresh() for _ in range(sessions))))
    return {"sessions": sessions, "queued_at_drop": queued_before, "idle_s": idle_s,
            "new_sessions_started": ok, "new_sessions_s": time.perf_counter() - started}


def _audio_ladder(url: str, ladder: tuple[int, ...], hold_s: float, log) -> dict:
    """More 16 kHz streams (20 ms int16 frames) until p99 latency passes the limit."""
    steps, sustained = [], 0
    for n in ladder:
        log(f"server bench: {n} real-time 16 kHz audio streams")
        run = _stream(url, "digits", n, hold_s, rate=16000.0, frame=320, wire="int16",
                      sample_rate=16000.0)  # fmt: skip
        p99 = run["latency_hold_ms"]["p99"]
        good = run["ok"] and p99 is not None and p99 < AUDIO_P99_LIMIT_MS
        steps.append({"streams": n, "p99_ms": p99, "ok": run["ok"], "sustained": good,
                      "frames_per_s": run["throughput"]["frames_per_s"]})  # fmt: skip
        if not good:
            break
        sustained = n
    return {"p99_limit_ms": AUDIO_P99_LIMIT_MS, "max_streams": sustained, "ladder": steps}


def _tree_rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of a process and its children (the workers of a supervisor): all of
    them (VmRSS), or one part (RssAnon: private memory, what a leak grows)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += int(re.search(rf"{field}:\s+(\d+)", status).group(1)) * 1024
        todo += [int(c) for c in children]
    return total


def run_soak(scratch: Path, quick: bool, log=print) -> dict:
    """300 sessions × 20 Hz per-sample frames for 10 minutes (quick: 10 × 8 s): replies all
    correct, no session closed, server RSS after a 180 s warm-up vs at the end. The warm-up
    covers the session records' growth: each record carries its session's last replies, and
    as that ring fills (~2 min at 20 Hz) records move to larger slab slots, whose mapped
    pages count in RSS; measured (session 19): RSS rose to ~120 s, then held flat."""
    sessions, hold_s, warm_s = (10, 8.0, 3.0) if quick else (300, 600.0, 180.0)
    motion_dir, _ = served_model("motion", scratch)
    workers = 1 if quick else cpu_cores()
    samples: list[tuple[float, int, int]] = []
    with ServerProcess.s4serve([motion_dir], log_path=scratch / "s4serve-soak.log",
                               extra=["--workers", str(workers), "--snapshot-dir",
                                      str(scratch / "soak-sessions")]) as server:
        log(f"soak: {sessions} sessions × 20 Hz for {hold_s:.0f} s")
        stop = threading.Event()

        def sample() -> None:
            began = time.monotonic()
            while not stop.wait(5.0):
                samples.append((time.monotonic() - began, _tree_rss(server.pid),
                                _tree_rss(server.pid, "RssAnon")))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            run = _stream(server.url, "motion", sessions, hold_s, rate=20.0, frame=1)
        finally:
            stop.set()
            sampler.join()
    warm = [s for s in samples if s[0] >= warm_s] or samples
    growth = (warm[-1][1] - warm[0][1]) / warm[0][1] if warm else None
    return {"sessions": sessions, "rate": 20.0, "hold_s": hold_s, "workers": workers,
            "run": run, "warm_s": warm_s, "rss_after_warmup": warm[0][1] if warm else None,
            "rss_end": warm[-1][1] if warm else None, "rss_growth": growth,
            "rss_curve": [(round(t), total, anon) for t, total, anon in samples[::6]],
            "anon_after_warmup": warm[0][2] if warm else None,
            "anon_end": warm[-1][2] if warm else None}
