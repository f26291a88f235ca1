"""Prometheus metrics, named as in docs/internals.md. Never a per-session label."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)


def observe_many(child: Histogram, values: np.ndarray) -> None:
    """`child.observe(v)` for every v, in one pass: the hot path answers hundreds of frames per
    tick, and one observe each (a lock and a bucket search) was a visible share of it.
    Reads prometheus_client's bucket fields (stable since 0.4; tests compare with observe)."""
    if not len(values):
        return
    bounds = child._upper_bounds  # ascending, ends with +Inf
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, count in zip(child._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)
    child._sum.inc(float(values.sum()))


# `_created` series double the exposition for little use; dashboards rely on `_total`.
disable_created_metrics()

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_COMPUTE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    """One registry per app, so that several servers in one process stay separate.

    With `multiprocess_dir` (the workers of `serve --workers N`), values live in
    prometheus_client's per-process files there and the exposition sums every worker's; gauges
    say how (`livesum`: only live workers count)."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_active = Gauge(
            "s4serve_sessions_active", "Streaming sessions with an open connection.",
            ["model"], registry=r, multiprocess_mode="livesum",
        )
        self.sessions_opened = Counter(
            "s4serve_sessions_opened_total", "Streaming sessions started or resumed.",
            ["model"], registry=r,
        )
        self.session_limit = Gauge(
            "s4serve_session_limit", "Most concurrent streaming sessions allowed.", registry=r,
            multiprocess_mode="livesum",
        )
        self.samples = Counter(
            "s4serve_samples_total", "Input samples processed.", ["model", "mode"], registry=r
        )
        self.frames = Counter(
            "s4serve_frames_total", "WebSocket data frames answered.",
            ["model", "outcome"], registry=r,
        )
        self.requests = Counter(
            "s4serve_requests_total", "Predict requests answered.",
            ["model", "outcome"], registry=r,
        )
        self.frame_latency = Histogram(
            "s4serve_frame_latency_seconds", "Time from receiving a frame to sending its reply.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.predict_latency = Histogram(
            "s4serve_predict_latency_seconds", "Time to answer a predict request.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.step_batch_size = Histogram(
            "s4serve_step_batch_size", "Sessions advanced by one batched step or chunk call.",
            ["model"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.step_seconds = Histogram(
            "s4serve_step_seconds", "Compute time of one batched recurrent call.",
            ["model", "kind"], buckets=_COMPUTE_BUCKETS, registry=r,
        )
        self.conv_seconds = Histogram(
            "s4serve_conv_seconds", "Compute time of one predict call.",
            ["model"], buckets=_COMPUTE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "s4serve_queue_depth", "Frames waiting to be computed.", ["model"], registry=r,
            multiprocess_mode="livesum",
        )
        self.mux_messages = Counter(
            "s4serve_mux_messages_total", "Mux data messages, by path: batched (one sample "
            "for each of distinct idle sessions, vectorised) or per_entry.",
            ["model", "path"], registry=r,
        )
        self.handoffs = Counter(
            "s4serve_handoffs_total", "Live sessions taken over from another worker or replica.",
            registry=r,
        )
        self.checkpoints = Counter(
            "s4serve_checkpoints_total", "Live sessions' states written to the session store, "
            "by result: written, or fenced (another process had taken the session over).",
            ["result"], registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "s4serve_checkpoint_seconds", "CPU time of one checkpoint pass (the state "
            "copy and encoding on the event loop, the store write in its writer thread; not "
            "the ticks that run between its slices).",
            registry=r, buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        )
        self.errors = Counter(
            "s4serve_errors_total", "Errors answered, by code.", ["code"], registry=r
        )
        self.model_info = Gauge(
            "s4serve_model_info", "Served models (value 1).",
            ["model", "version", "layer", "device", "backend"], registry=r,
            multiprocess_mode="max",
        )

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return generate_latest(registry)


class ModelMetrics:
    """One model's metric children, resolved once (a label lookup takes a lock), and what the
    scheduler's ticks observed since the last `flush`. With `--workers` every observation is a
    locked write to a memory-mapped file (a few us each, ten per tick): ticks only append to
    plain lists, and `flush` hands them over in bulk, at most every FLUSH_S."""

    FLUSH_S = 0.05

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.frames_ok = metrics.frames.labels(name, "ok")
        self.latency = metrics.frame_latency.labels(name)
        self.step = metrics.step_seconds.labels(name, "step")
        self.chunk = metrics.step_seconds.labels(name, "chunk")
        self.batch = metrics.step_batch_size.labels(name)
        self.samples = metrics.samples.labels(name, "stream")
        self.queue = metrics.queue_depth.labels(name)
        self.mux_batched = metrics.mux_messages.labels(name, "batched")
        self.queued = 0  # frames waiting, this model
        self.queued_bytes = 0  # their samples (float32), what bounds their memory
        self.latencies: list[float] = []  # receipt times of the frames answered this tick
        self.waited: list[np.ndarray] = []  # receipt -> reply seconds, ticks not flushed yet
        self.together: list[tuple[float, int]] = []  # (seconds, frames): many answered at once
        self.messages = 0  # mux messages stepped as they came (batched)
        self.calls: dict[str, list[float]] = {"step": [], "chunk": []}  # seconds per call
        self.batches: list[int] = []  # sessions per call
        self.advanced = 0  # samples
        self.flushed = 0.0  # perf_counter of the last flush

    def call(self, kind: str, seconds: float, sessions: int, samples: int) -> None:
        """One batched call: `kind` step or chunk, its time, sessions and samples advanced."""
        self.calls[kind].append(seconds)
        self.batches.append(sessions)
        self.advanced += samples

    def answered(self, now: float) -> None:
        """End of a tick: the frames answered in it waited since their receipt until now."""
        if self.latencies:
            self.waited.append(now - np.asarray(self.latencies))
            self.latencies.clear()

    def message(self, seconds: float, frames: int) -> None:
        """A mux message's `frames` stepped and answered together, `seconds` after its
        receipt (kept as a pair: an array per message cost a few us of a ~30 us message)."""
        self.together.append((seconds, frames))
        self.messages += 1

    @property
    def pending(self) -> bool:
        return bool(self.waited or self.together or self.batches or self.advanced)

    def flush(self, now: float) -> None:
        """Hand everything observed so far to prometheus_client."""
        self.flushed = now
        if self.together:
            pairs = np.array(self.together)  # (messages, 2)
            self.waited.append(np.repeat(pairs[:, 0], pairs[:, 1].astype(np.int64)))
            self.together.clear()
            self.mux_batched.inc(self.messages)
            self.messages = 0
        if self.waited:
            waited = np.concatenate(self.waited)
            self.waited.clear()
            observe_many(self.latency, waited)
            self.frames_ok.inc(len(waited))
        for kind, seconds in self.calls.items():
            if seconds:
                observe_many(self.step if kind == "step" else self.chunk, np.asarray(seconds))
                seconds.clear()
        if self.batches:
            observe_many(self.batch, np.asarray(self.batches, np.float64))
            self.batches.clear()
        if self.advanced:
            self.samples.inc(self.advanced)
            self.advanced = 0
        self.queue.set(self.queued)


class FlushTimer:
    """When the models' observations reach prometheus_client: every ModelMetrics.FLUSH_S
    while ticks run, and once IDLE_S pass without a tick. (Timed from the last flush instead,
    a mux connection at 100 Hz, quiet between its messages, paid a ~90 us flush every 5 ms.)"""

    IDLE_S = 0.005

    def __init__(self, models: dict) -> None:
        self.models = models  # ModelMetrics by pool, shared with the scheduler
        self.loop = None  # the event loop, once started
        self._timer = None
        self._active = 0.0  # perf_counter of the last tick

    def ticked(self, now: float, quiet: bool) -> None:
        """After a tick (or a mux step) at `now`; `quiet`: no other tick is due."""
        self._active = now
        for model in self.models.values():
            model.answered(now)
            if now - model.flushed >= model.FLUSH_S:
                model.flush(now)
        if quiet and self._timer is None and any(m.pending for m in self.models.values()):
            self._timer = self.loop.call_later(self.IDLE_S, self._if_quiet)

    def _if_quiet(self) -> None:
        self._timer = None
        quiet = time.perf_counter() - self._active
        if quiet < self.IDLE_S:
            self._timer = self.loop.call_later(self.IDLE_S - quiet, self._if_quiet)
        else:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.perf_counter()
        for model in self.models.values():
            model.flush(now)
