"""Repeat-and-summarise timing: every number in the report is a median with its IQR."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.stats import median_iqr


@dataclass
class Timing:
    """Seconds per call: median and interquartile range over `repeats` measurements."""

    median_s: float
    iqr_s: float
    repeats: int

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "iqr_s": self.iqr_s, "repeats": self.repeats}


def time_call(
    fn: Callable[[], object], repeats: int = 7, inner: int = 1, warmup: int = 1
) -> Timing:
    """Time `fn` `inner` times per repeat; the per-call time of each repeat is one sample."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    med, iqr = median_iqr(samples)
    return Timing(med, iqr, repeats)


def inner_for(target_s: float, fn: Callable[[], object]) -> int:
    """How many calls fill about `target_s` seconds (at least one), from one trial call."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(target_s / once))
