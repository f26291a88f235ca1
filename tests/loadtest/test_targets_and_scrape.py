"""Pure parts: target checks, URL forms, metric scraping arithmetic, latency summaries."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from loadtest.scrape import histogram_delta, parse_metrics
from loadtest.stats import latency_summary_ms, median_iqr, timeline
from loadtest.targets import RemoteTargetError, check_target


def test_only_loopback_targets_unless_allowed():
    check_target("http://127.0.0.1:8000")
    check_target("http://localhost:8000")
    with pytest.raises(RemoteTargetError):
        check_target("http://10.11.12.13:8000")
    check_target("http://10.11.12.13:8000", allow_remote=True)


def test_histogram_delta_counts_only_the_interval():
    registry = CollectorRegistry()
    hist = Histogram("s4serve_step_batch_size", "b", ["model"], registry=registry,
                     buckets=(1, 2, 4, 8, 16, 32))  # fmt: skip
    queue = Gauge("s4serve_queue_depth", "q", ["model"], registry=registry)
    for v in (1, 1, 1, 1):
        hist.labels("m").observe(v)
    hist.labels("other").observe(30)
    before = parse_metrics(generate_latest(registry).decode())
    for v in (10, 12, 14, 16):
        hist.labels("m").observe(v)
    queue.labels("m").set(7)
    after = parse_metrics(generate_latest(registry).decode())
    delta = histogram_delta(after, before, "s4serve_step_batch_size", model="m")
    assert delta["count"] == 4
    assert delta["mean"] == pytest.approx(13.0)
    assert 8 <= delta["p50"] <= 16 and 8 <= delta["p99"] <= 16
    assert after[("s4serve_queue_depth", (("model", "m"),))] == 7
    assert histogram_delta(after, after, "s4serve_step_batch_size", model="m") is None


def test_latency_summary_timeline_and_spread():
    rng = np.random.default_rng(0)
    lat = rng.exponential(0.002, 5000)
    sent = np.sort(rng.uniform(0, 3, 5000))
    s = latency_summary_ms(lat)
    assert s["count"] == 5000
    assert s["p50"] < s["p90"] < s["p99"] <= s["max"]
    assert s["p50"] == pytest.approx(np.median(lat) * 1e3)
    tl = timeline(sent, lat)
    assert tl["t"] == [0.0, 1.0, 2.0] and sum(tl["frames"]) == 5000
    assert latency_summary_ms(np.zeros(0))["p99"] is None
    assert median_iqr([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 2.0)
