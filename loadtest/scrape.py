"""The server's own view of a load test, from its Prometheus /metrics (names: docs/internals.md)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str) -> dict[Key, float]:
    """Every sample of an exposition as {(sample name, sorted labels): value}."""
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _select(samples: dict[Key, float], name: str, **labels: str) -> dict[Key, float]:
    want = set(labels.items())
    return {k: v for k, v in samples.items() if k[0] == name and want <= set(k[1])}


def _total(samples: dict[Key, float], name: str, **labels: str) -> float:
    return sum(_select(samples, name, **labels).values())


def _delta(after: dict[Key, float], before: dict[Key, float], name: str, **labels: str) -> float:
    return _total(after, name, **labels) - _total(before, name, **labels)


def histogram_delta(
    after: dict[Key, float], before: dict[Key, float], name: str, **labels: str
) -> dict | None:
    """Mean and approximate p50/p99 (bucket interpolation) of a histogram over an interval."""
    count = _delta(after, before, f"{name}_count", **labels)
    if count <= 0:
        return None
    buckets: dict[float, float] = {}
    for key, value in _select(after, f"{name}_bucket", **labels).items():
        le = float(dict(key[1])["le"])
        buckets[le] = buckets.get(le, 0.0) + value - before.get(key, 0.0)
    total = _delta(after, before, f"{name}_sum", **labels)
    return {
        "count": count,
        "mean": total / count,
        "p50": _bucket_quantile(buckets, 0.5),
        "p99": _bucket_quantile(buckets, 0.99),
    }


def _bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Linear interpolation inside the bucket holding the q-quantile, as PromQL does."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    rank = q * buckets[edges[-1]]
    lower, below = 0.0, 0.0
    for le in edges:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower
            width = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / width if width else 1.0)
        lower, below = le, buckets[le]
    return lower


@dataclass
class ServerView:
    """What the server reported during the run (None where it exposes no such metric)."""

    available: bool = False
    step_batch_size: dict | None = None
    step_seconds: dict[str, dict | None] = field(default_factory=dict)
    frame_latency: dict | None = None
    frames: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    queue_depth_max: float | None = None
    queue_depth_mean: float | None = None
    sessions_active_max: float | None = None


class MetricsPoller:
    """Scrapes /metrics before, during (gauges) and after a run."""

    def __init__(self, base_url: str, model: str, headers: dict[str, str], interval_s: float):
        self.url = f"{base_url}/metrics"
        self.model = model
        self.headers = headers
        self.interval_s = interval_s
        self.before: dict[Key, float] | None = None
        self.queue: list[float] = []
        self.active: list[float] = []

    async def scrape(self, client: httpx.AsyncClient) -> dict[Key, float] | None:
        try:
            resp = await client.get(self.url, headers=self.headers, timeout=10)
            return parse_metrics(resp.text) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def poll(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """Sample the gauges every interval until `stop` is set."""
        while not stop.is_set():
            now = await self.scrape(client)
            if now:
                self.queue.append(_total(now, "s4serve_queue_depth", model=self.model))
                self.active.append(_total(now, "s4serve_sessions_active", model=self.model))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    def view(self, after: dict[Key, float] | None) -> ServerView:
        before = self.before or {}
        if not after or not any(k[0].startswith("s4serve_") for k in after):
            return ServerView()
        m = {"model": self.model}
        return ServerView(
            available=True,
            step_batch_size=histogram_delta(after, before, "s4serve_step_batch_size", **m),
            step_seconds={
                kind: histogram_delta(after, before, "s4serve_step_seconds", kind=kind, **m)
                for kind in ("step", "chunk")
            },
            frame_latency=histogram_delta(after, before, "s4serve_frame_latency_seconds", **m),
            frames={
                o: _delta(after, before, "s4serve_frames_total", outcome=o, **m)
                for o in ("ok", "error")
            },
            errors=_error_deltas(after, before),
            queue_depth_max=max(self.queue) if self.queue else None,
            queue_depth_mean=sum(self.queue) / len(self.queue) if self.queue else None,
            sessions_active_max=max(self.active) if self.active else None,
        )


def _error_deltas(after: dict[Key, float], before: dict[Key, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in _select(after, "s4serve_errors_total").items():
        d = value - before.get(key, 0.0)
        if d:
            out[dict(key[1]).get("code", "?")] = d
    return out
