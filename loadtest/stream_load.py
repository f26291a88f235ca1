"""The streaming load test: plan sessions, run them (in one or several processes), judge them."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from client import AsyncClient, ClientError
from client.connection import base_url
from client.wire import as_seen_by_server
from loadtest.config import StreamLoadConfig
from loadtest.processes import UNREACHABLE_S, wait_ready
from loadtest.raw_session import run_raw_plans
from loadtest.scrape import MetricsPoller, ServerView
from loadtest.session import SessionPlan, SessionRecord, run_session
from loadtest.signals import SignalSource
from loadtest.stats import latency_summary_ms, timeline
from loadtest.targets import check_target

# Signals longer than this repeat; keeps memory flat for long, fast streams.
SIGNAL_LOOP_SAMPLES = 1 << 16
WORKER_START_MARGIN_S = 3.0


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def fetch_model_info(base: str, model: str, token: str | None) -> dict:
    async with AsyncClient(base, token, timeout=30) as api:
        try:
            return await api.model(model)
        except (ClientError, httpx.HTTPError) as exc:
            reason = str(exc) or type(exc).__name__
            raise RuntimeError(f"GET {base}/v1/models/{model}: {reason}") from None


def verify_indices(cfg: StreamLoadConfig) -> set[int]:
    """Sessions spread over the ramp whose values are checked against predict."""
    n = min(cfg.verify_sessions, cfg.sessions)
    return {int(i) for i in np.linspace(0, cfg.sessions - 1, n).round()} if n else set()


def plan_sessions(
    cfg: StreamLoadConfig, d_input: int, indices: list[int], t0: float
) -> list[SessionPlan]:
    source = SignalSource(cfg.signal, d_input, cfg.seed, cfg.npy_path)
    stop_at = t0 + cfg.ramp_s + cfg.hold_s
    checked = verify_indices(cfg)
    plans = []
    for i in indices:
        start_at = t0 + cfg.ramp_s * i / cfg.sessions
        frames = int((stop_at - start_at) / cfg.frame_period_s) + 1
        length = min(frames * cfg.frame, max(SIGNAL_LOOP_SAMPLES, cfg.verify_max_samples))
        length = -(-length // cfg.frame) * cfg.frame
        seen = as_seen_by_server(source.for_session(i, length), cfg.wire)
        plans.append(
            SessionPlan(
                index=i,
                start_at=start_at,
                stop_at=stop_at,
                period_s=cfg.frame_period_s,
                frame=cfg.frame,
                wire=cfg.wire,
                seen=seen,
                verify=i in checked,
                verify_max_samples=cfg.verify_max_samples,
                max_in_flight=cfg.max_in_flight,
                sample_rate=cfg.sample_rate,
            )
        )
    return plans


async def run_plans(cfg: StreamLoadConfig, info: dict, plans: list[SessionPlan]) -> list:
    base = base_url(cfg.url)
    if engine_for(cfg) == "raw":
        return await run_raw_plans(plans, base, cfg.model, cfg.token, int(info["d_output"]),
                                   cfg.drain_s)
    tasks = [run_session(p, base, cfg.model, cfg.token, cfg.drain_s) for p in plans]
    return list(await asyncio.gather(*tasks))


def engine_for(cfg: StreamLoadConfig) -> str:
    """`auto`: the lean engine where it applies (binary frames over plain ws://)."""
    if cfg.engine != "auto":
        return cfg.engine
    plain = base_url(cfg.url).startswith("http://")
    return "raw" if cfg.wire != "json" and plain else "client"


def _worker(cfg_json: str, info: dict, indices: list[int], t0: float) -> list[SessionRecord]:
    """Entry point of a client process: its share of the sessions on its own event loop."""
    cfg = StreamLoadConfig.model_validate_json(cfg_json)
    plans = plan_sessions(cfg, int(info["d_input"]), indices, t0)
    return run_loop(run_plans(cfg, info, plans))


def run_loop(coro):
    try:
        import uvloop  # the faster loop, when installed, so the client is less of a bottleneck

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def run_sessions(cfg: StreamLoadConfig, info: dict, t0: float) -> list[SessionRecord]:
    indices = list(range(cfg.sessions))
    if cfg.workers == 1:
        return await run_plans(cfg, info, plan_sessions(cfg, int(info["d_input"]), indices, t0))
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
        shares = [indices[w :: cfg.workers] for w in range(cfg.workers)]
        futures = [
            loop.run_in_executor(pool, _worker, cfg.model_dump_json(), info, share, t0)
            for share in shares
            if share
        ]
        return [rec for part in await asyncio.gather(*futures) for rec in part]


@dataclass
class StreamResult:
    """A finished streaming run, judged: `ok` is False on any lost/wrong/mismatched reply."""

    config: dict
    model_info: dict
    ok: bool
    failures: list[str]
    counts: dict[str, int]
    errors: dict[str, int]
    throughput: dict[str, float]
    latency_ms: dict
    latency_hold_ms: dict
    client: dict
    verify: dict
    server: dict
    timeline: dict = field(default_factory=dict)
    latency_s: np.ndarray | None = None
    sent_at_s: np.ndarray | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("latency_s")
        out.pop("sent_at_s")
        return out


async def verify_records(cfg: StreamLoadConfig, base: str, records: list[SessionRecord]) -> dict:
    """Streamed outputs vs one predict call on the same inputs, per checked session."""
    checked = [r for r in records if r.verify_outputs is not None]
    worst, failed, detail = 0.0, 0, []
    async with AsyncClient(base, cfg.token) as api:
        for rec in checked:
            try:
                out = (await api.predict(cfg.model, rec.verify_inputs[None],
                                         sample_rate=cfg.sample_rate)).outputs
                code = None
            except ClientError as exc:
                out, code = None, exc.code
            if out is None or out.shape[1:] != rec.verify_outputs.shape:
                failed += 1
                detail.append(
                    {"session": rec.index, "error": code or f"shape {getattr(out, 'shape', None)}"}
                )
                continue
            err = float(np.max(np.abs(out[0].astype(np.float64) - rec.verify_outputs)))
            worst = max(worst, err)
            failed += err > cfg.tolerance
            detail.append(
                {"session": rec.index, "samples": len(rec.verify_outputs), "max_abs_err": err}
            )
    return {
        "sessions": len(checked),
        "failed": failed,
        "max_abs_err": worst if checked else None,
        "tolerance": cfg.tolerance,
        "detail": detail,
    }


def judge(
    cfg: StreamLoadConfig,
    info: dict,
    records: list[SessionRecord],
    t0: float,
    verify: dict,
    server: ServerView,
) -> StreamResult:
    counts = Counter()
    errors: Counter = Counter()
    for rec in records:
        for key in ("frames_sent", "replies_ok", "lost", "duplicated", "wrong"):
            counts[key] += getattr(rec, key)
        counts["connected"] += rec.connected
        counts["end_mismatch"] += rec.end_mismatch
        counts["stalls"] += rec.stalls
        errors.update(rec.errors)
    counts["sessions"] = cfg.sessions
    sent_at = (
        np.concatenate([r.sent_at for r in records if r.sent_at is not None] or [np.zeros(0)]) - t0
    )
    latency = np.concatenate([r.latency for r in records if r.latency is not None] or [np.zeros(0)])
    hold_lo, hold_hi = cfg.ramp_s, cfg.ramp_s + cfg.hold_s
    in_hold = (sent_at >= hold_lo) & (sent_at < hold_hi)
    frames_hold = int(in_hold.sum())
    offered = cfg.sessions * cfg.rate / cfg.frame
    throughput = {
        "offered_frames_per_s": offered,
        "frames_per_s": frames_hold / cfg.hold_s,
        "samples_per_s": frames_hold * cfg.frame / cfg.hold_s,
        "achieved_ratio": frames_hold / cfg.hold_s / offered,
    }
    failures = []
    for key in ("lost", "duplicated", "wrong", "end_mismatch"):
        if counts[key]:
            failures.append(f"{counts[key]} {key}")
    if counts["connected"] < cfg.sessions:
        failures.append(f"{cfg.sessions - counts['connected']} sessions failed to start")
    if errors:
        failures.append("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    if verify["failed"]:
        failures.append(f"{verify['failed']} sessions disagree with predict")
    return StreamResult(
        config=cfg.model_dump(),
        model_info=info,
        ok=not failures,
        failures=failures,
        counts=dict(counts),
        errors=dict(errors),
        throughput=throughput,
        latency_ms=latency_summary_ms(latency),
        latency_hold_ms=latency_summary_ms(latency[in_hold]),
        client={
            "max_send_lag_ms": 1e3 * max((r.max_send_lag_s for r in records), default=0.0),
            "workers": cfg.workers,
        },
        verify=verify,
        server=asdict(server),
        timeline=timeline(sent_at, latency),
        latency_s=latency,
        sent_at_s=sent_at,
    )


async def run_stream_load(cfg: StreamLoadConfig) -> StreamResult:
    """Run the whole streaming load test against cfg.url and judge it."""
    check_target(cfg.url, cfg.allow_remote)
    base = base_url(cfg.url)
    headers = auth_headers(cfg.token)
    await asyncio.to_thread(wait_ready, base, cfg.ready_timeout_s, unreachable_s=UNREACHABLE_S)
    info = await fetch_model_info(base, cfg.model, cfg.token)
    poller = MetricsPoller(base, cfg.model, headers, cfg.scrape_interval_s)
    stop = asyncio.Event()
    async with httpx.AsyncClient() as client:
        poller.before = await poller.scrape(client)
        polling = asyncio.create_task(poller.poll(client, stop))
        t0 = time.monotonic() + (WORKER_START_MARGIN_S if cfg.workers > 1 else 0.05)
        records = await run_sessions(cfg, info, t0)
        stop.set()
        await polling
        after = await poller.scrape(client)
    verify = await verify_records(cfg, base, records)
    return judge(cfg, info, records, t0, verify, poller.view(after))
