"""`loadtest mux`: sensor gateways, each one connection carrying many sessions.

Every gateway opens its sessions on one mux connection and, `rate` times a second, sends one
data message with one frame per session (open loop: it does not wait for replies). Every reply
is checked (same order, every entry answered ok with the right number of rows) and, for a few
sessions per gateway, the outputs are compared with a whole-sequence predict at the end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from client import AsyncClient
from client.connection import base_url
from client.mux import AsyncMux
from loadtest.processes import UNREACHABLE_S, wait_ready
from loadtest.stream_load import fetch_model_info
from loadtest.targets import check_target


class MuxLoadConfig(BaseModel):
    url: str
    model: str
    gateways: int = Field(10, ge=1, le=1000)
    sessions_per_gateway: int = Field(100, ge=1, le=4096)
    rate: float = Field(100.0, gt=0, le=10_000, description="messages/s per gateway")
    frame: int = Field(1, ge=1, le=10_000, description="samples per session per message")
    hold_s: float = Field(10.0, gt=0, le=3600)
    drain_s: float = Field(10.0, gt=0, le=300)
    verify_sessions: int = Field(1, ge=0, description="sessions per gateway checked by predict")
    tolerance: float = Field(1e-4, gt=0)
    max_in_flight: int = Field(256, ge=1, description="unanswered messages per gateway")
    allow_remote: bool = False
    token: str | None = None
    seed: int = 0


@dataclass
class MuxResult:
    config: dict
    ok: bool
    failures: list[str]
    counts: dict
    latency_ms: dict
    throughput: dict
    verify: dict = field(default_factory=dict)
    # perf_counter when the first message was due: gateway i sends its message k at
    # schedule_start + (i / gateways + k) / rate (how a caller finds the steady part of a run)
    schedule_start: float = 0.0
    max_send_lag_s: float = 0.0  # the latest any message went out after it was due


@dataclass
class _Gateway:
    sent: int = 0
    answered: int = 0
    bad: int = 0
    errors: dict = field(default_factory=dict)
    latency: list = field(default_factory=list)
    lag: float = 0.0  # seconds, the most a message went out after it was due
    checks: list = field(default_factory=list)  # (inputs, outputs) of verified sessions


def _signal(rng: np.random.Generator, length: int, channels: int) -> np.ndarray:
    t = np.arange(length)[:, None]
    phase, freq = rng.uniform(0, 6.28, channels), rng.uniform(0.01, 0.2, channels)
    return (np.sin(phase + freq * t) + 0.1 * rng.standard_normal((length, channels))).astype(
        np.float32)


async def _gateway(cfg: MuxLoadConfig, index: int, info: dict, t0: float) -> _Gateway:
    g = _Gateway()
    messages = int(cfg.hold_s * cfg.rate)
    length = messages * cfg.frame
    rng = np.random.default_rng(cfg.seed + index)
    verified = min(cfg.verify_sessions, cfg.sessions_per_gateway)
    inputs = [_signal(rng, length, info["d_input"]) for _ in range(verified)]
    plain = np.zeros((cfg.frame, info["d_input"]), "<f4").tobytes()
    async with AsyncMux(cfg.url, cfg.model, cfg.token, reconnect=False) as mux:
        sids = [await mux.open() for _ in range(cfg.sessions_per_gateway)]
        outputs: list[list[np.ndarray]] = [[] for _ in range(verified)]
        gate = asyncio.Semaphore(cfg.max_in_flight)

        async def one(k: int) -> None:
            entries = []
            for i, sid in enumerate(sids):
                data = inputs[i][k * cfg.frame:(k + 1) * cfg.frame].tobytes() if i < verified \
                    else plain
                entries.append((sid, data, cfg.frame))
            sent = time.perf_counter()
            try:
                replies = await mux.send_raw(entries)
            finally:
                gate.release()
            g.latency.append(time.perf_counter() - sent)
            good = len(replies) == len(sids)
            for i, (sid, out) in enumerate(replies):
                if isinstance(out, Exception):
                    g.errors[out.code] = g.errors.get(out.code, 0) + 1
                    good = False
                    continue
                good &= sid == sids[i] and out.shape[0] == cfg.frame
                if i < verified:
                    outputs[i].append(out.copy())
            g.answered += 1
            g.bad += not good

        tasks = []
        start = t0 + (index / cfg.gateways) / cfg.rate
        for k in range(messages):
            delay = start + k / cfg.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            g.lag = max(g.lag, time.perf_counter() - (start + k / cfg.rate))
            g.sent += 1
            tasks.append(asyncio.create_task(one(k)))
        _, pending = await asyncio.wait(tasks, timeout=cfg.drain_s) if tasks else ((), ())
        for task in pending:
            task.cancel()
        for i in range(verified):
            if len(outputs[i]) == messages:
                g.checks.append((inputs[i], np.concatenate(outputs[i])))
    return g


async def run_mux_load(cfg: MuxLoadConfig) -> MuxResult:
    check_target(cfg.url, cfg.allow_remote)
    base = base_url(cfg.url)
    await asyncio.to_thread(wait_ready, base, unreachable_s=UNREACHABLE_S)
    info = await fetch_model_info(base, cfg.model, cfg.token)
    t0 = time.perf_counter() + 1.0 + cfg.gateways * cfg.sessions_per_gateway / 2000
    gateways = await asyncio.gather(*(_gateway(cfg, i, info, t0) for i in range(cfg.gateways)))
    sent = sum(g.sent for g in gateways)
    answered = sum(g.answered for g in gateways)
    bad = sum(g.bad for g in gateways)
    errors: dict = {}
    for g in gateways:
        for code, n in g.errors.items():
            errors[code] = errors.get(code, 0) + n
    latency = np.concatenate([g.latency for g in gateways] or [np.zeros(0)]) * 1e3
    worst = 0.0
    checked = 0
    async with AsyncClient(base, cfg.token) as api:
        for g in gateways:
            for u, y in g.checks:
                expected = (await api.predict(cfg.model, u[None])).outputs[0]
                worst = max(worst, float(np.abs(expected - y).max()))
                checked += 1
    failures = []
    if sent - answered:
        failures.append(f"{sent - answered} messages lost")
    if bad:
        failures.append(f"{bad} replies wrong or with rejected entries")
    failures += [f"{n} entries {code}" for code, n in errors.items()]
    if worst > cfg.tolerance:
        failures.append(f"outputs differ from predict by {worst:.2e}")
    if checked < min(cfg.verify_sessions, cfg.sessions_per_gateway) * cfg.gateways:
        failures.append("not every verified session was answered in full")
    pct = (lambda q: round(float(np.percentile(latency, q)), 3)) if len(latency) else (
        lambda q: None)
    samples = answered * cfg.sessions_per_gateway * cfg.frame
    return MuxResult(
        config=cfg.model_dump(exclude={"token"}), ok=not failures, failures=failures,
        counts={"messages_sent": sent, "messages_answered": answered, "lost": sent - answered,
                "bad_replies": bad, "entry_errors": errors},
        latency_ms={"p50": pct(50), "p99": pct(99), "max": pct(100)},
        throughput={"messages_per_s": answered / cfg.hold_s,
                    "session_samples_per_s": samples / cfg.hold_s,
                    "offered_session_samples_per_s":
                        cfg.gateways * cfg.sessions_per_gateway * cfg.rate * cfg.frame},
        verify={"sessions": checked, "max_abs_err": worst}, schedule_start=t0,
        max_send_lag_s=max(g.lag for g in gateways),
    )
