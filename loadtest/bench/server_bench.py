"""Server end to end: the load tester against s4serve and the echo app, side by side."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from websockets.asyncio.client import connect

from loadtest.bench.beside_predict import beside_predict
from loadtest.bench.k6_bench import run_k6
from loadtest.bench.mux_bench import run_mux
from loadtest.bench.networks import served_model
from loadtest.bench.proc_stats import tree_rss
from loadtest.bench.profile import finish_profile, start_profile
from loadtest.config import StreamLoadConfig
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
        results["mux"] = run_mux(server, motion_dir, gateways, per, hold_s, workers)
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
                samples.append((time.monotonic() - began, tree_rss(server.pid),
                                tree_rss(server.pid, "RssAnon")))

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
