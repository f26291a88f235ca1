"""Load on the predict endpoint: `concurrency` clients posting batch × length sequences."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx
import numpy as np

from client import AsyncClient, ClientError
from client.connection import base_url
from loadtest.config import PredictLoadConfig
from loadtest.signals import SignalSource
from loadtest.stats import latency_summary_ms
from loadtest.stream_load import fetch_model_info
from loadtest.targets import check_target


@dataclass
class PredictResult:
    config: dict
    model_info: dict
    ok: bool
    failures: list[str]
    requests: int
    requests_ok: int
    wrong_shape: int
    errors: dict[str, int]
    throughput: dict[str, float]
    latency_ms: dict

    def to_json(self) -> dict:
        return asdict(self)


async def run_predict_load(cfg: PredictLoadConfig) -> PredictResult:
    """Post until duration_s or max_requests; each answer must be (batch, length, d_output)."""
    check_target(cfg.url, cfg.allow_remote)
    base = base_url(cfg.url)
    info = await fetch_model_info(base, cfg.model, cfg.token)
    inputs = SignalSource(cfg.signal, int(info["d_input"]), cfg.seed, cfg.npy_path).batch(
        cfg.batch, cfg.length
    )
    want = (cfg.batch, cfg.length, int(info["d_output"]))
    latencies: list[float] = []
    errors: Counter = Counter()
    wrong = 0
    issued = 0
    deadline = time.monotonic() + cfg.duration_s

    async def client_loop(api: AsyncClient) -> None:
        nonlocal issued, wrong
        while time.monotonic() < deadline and issued < cfg.max_requests:
            issued += 1
            t = time.monotonic()
            try:
                out = (await api.predict(cfg.model, inputs, binary=cfg.body == "npy")).outputs
            except ClientError as exc:
                errors[exc.code] += 1
                continue
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                continue
            if out.shape != want:
                wrong += 1
            else:
                latencies.append(time.monotonic() - t)

    start = time.monotonic()
    async with AsyncClient(base, cfg.token, cfg.timeout_s, cfg.concurrency) as api:
        await asyncio.gather(*(client_loop(api) for _ in range(cfg.concurrency)))
    elapsed = time.monotonic() - start
    failures = [f"{wrong} wrong shape"] if wrong else []
    if errors:
        failures.append("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    ok_count = len(latencies)
    return PredictResult(
        config=cfg.model_dump(),
        model_info=info,
        ok=not failures,
        failures=failures,
        requests=issued,
        requests_ok=ok_count,
        wrong_shape=wrong,
        errors=dict(errors),
        throughput={
            "requests_per_s": ok_count / elapsed,
            "sequences_per_s": ok_count * cfg.batch / elapsed,
            "samples_per_s": ok_count * cfg.batch * cfg.length / elapsed,
        },
        latency_ms=latency_summary_ms(np.asarray(latencies)),
    )
