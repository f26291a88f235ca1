"""Summaries of latency samples: percentiles, per-second timelines, median and spread."""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def latency_summary_ms(latency_s: np.ndarray) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 and max in milliseconds (None when there are no samples)."""
    if latency_s.size == 0:
        return {"count": 0, "mean": None, "max": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = latency_s * 1e3
    pct = np.percentile(ms, PERCENTILES)
    return {
        "count": int(ms.size),
        "mean": float(ms.mean()),
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
        "max": float(ms.max()),
    }


def timeline(sent_at: np.ndarray, latency_s: np.ndarray, bin_s: float = 1.0) -> dict[str, list]:
    """Per-bin frame count and latency p50/p99 (ms), bins of send time from the run's start."""
    if sent_at.size == 0:
        return {"t": [], "frames": [], "p50_ms": [], "p99_ms": []}
    bins = np.floor(sent_at / bin_s).astype(np.int64)
    order = np.argsort(bins, kind="stable")
    bins, lat = bins[order], latency_s[order] * 1e3
    edges = np.flatnonzero(np.diff(bins)) + 1
    out: dict[str, list] = {"t": [], "frames": [], "p50_ms": [], "p99_ms": []}
    for b, chunk in zip(np.split(bins, edges), np.split(lat, edges), strict=True):
        out["t"].append(float(b[0] * bin_s))
        out["frames"].append(int(chunk.size))
        p50, p99 = np.percentile(chunk, (50, 99))
        out["p50_ms"].append(float(p50))
        out["p99_ms"].append(float(p99))
    return out


def median_iqr(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Median and interquartile range: robust to the odd slow repeat."""
    arr = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(arr, (25, 50, 75))
    return float(med), float(q3 - q1)
