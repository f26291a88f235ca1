"""End-to-end check of a running s4serve: readiness, one streaming session, one predict.

deploy/docker/smoke.sh runs it against the container; tests/deploy uses it to put real traffic
on a server before Prometheus scrapes it. It speaks through s4serve's client library (the
`client` package, installed with s4serve). Exits non-zero, with the reason, on the first thing
that is wrong.

    python deploy/docker/smoke_client.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np

from client import Client, ClientError, StreamError

# Metrics the server must expose once a session and a predict went through it.
EXPECTED_METRICS = (
    "s4serve_sessions_opened_total",
    "s4serve_samples_total",
    "s4serve_frame_latency_seconds_bucket",
    "s4serve_predict_latency_seconds_bucket",
    "s4serve_model_info",
)


class SmokeFailure(RuntimeError):
    """The server answered, but not as the wire contract says."""


@dataclass
class SmokeResult:
    model: str
    d_input: int
    d_output: int
    samples_streamed: int
    max_abs_diff_stream_vs_predict: float
    stream_seconds: float
    predict_seconds: float


def wait_ready(base_url: str, timeout: float) -> dict:
    """Polls /readyz until it answers 200; returns its body."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{base_url}/readyz", timeout=5)
            if answer.status_code == 200:
                return answer.json()
            last = f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise SmokeFailure(f"/readyz not ready after {timeout:.0f}s (last: {last})")


def stream_session(api: Client, name: str, d_input: int, frames: np.ndarray) -> np.ndarray:
    """Streams `frames` (n_frames, T, d_input) as binary float32 frames; returns the outputs
    (n_frames * T, d_output) in order."""
    outputs = []
    with api.stream(name, reconnect=False) as session:
        if session.info.get("d_input") != d_input:
            raise SmokeFailure(f"unexpected start answer: {session.info}")
        for frame in frames:
            out = session.send(frame)
            if out.shape[0] != len(frame):
                raise SmokeFailure(f"{out.shape[0]} output rows for a frame of {len(frame)}")
            outputs.append(out)
        samples = session.end()
    expected = frames.shape[0] * frames.shape[1]
    if samples != expected:
        raise SmokeFailure(f"end answered samples={samples}, expected {expected}")
    return np.concatenate(outputs)


def run_smoke(base_url: str, timeout: float = 120.0, n_frames: int = 4, frame_len: int = 16,
              seed: int = 0) -> SmokeResult:
    """Waits for readiness, streams one session and predicts the same samples in one request
    through the first served model; the two views must agree (the contract says they do)."""
    base_url = base_url.rstrip("/")
    wait_ready(base_url, timeout)
    with Client(base_url, timeout=60) as api:
        models = api.models()
        if not models:
            raise SmokeFailure("the server is ready but serves no model")
        info = models[0]
        name, d_input, d_output = info["name"], info["d_input"], info["d_output"]
        rng = np.random.default_rng(seed)
        frames = (0.5 * rng.standard_normal((n_frames, frame_len, d_input))).astype(np.float32)

        began = time.perf_counter()
        streamed = stream_session(api, name, d_input, frames)
        stream_seconds = time.perf_counter() - began

        began = time.perf_counter()
        whole = api.predict(name, frames.reshape(1, -1, d_input)).outputs[0].astype(np.float64)
        predict_seconds = time.perf_counter() - began

        if whole.shape != streamed.shape or not np.isfinite(streamed).all():
            raise SmokeFailure(f"stream {streamed.shape} vs predict {whole.shape}, or non-finite")
        diff = float(np.max(np.abs(whole - streamed)))
        scale = max(1.0, float(np.max(np.abs(whole))))
        if diff > 2e-3 * scale:
            raise SmokeFailure(f"stream and predict disagree by {diff:.3g} (scale {scale:.3g})")

        exposition = httpx.get(f"{base_url}/metrics", timeout=30).text
        missing = [m for m in EXPECTED_METRICS if m not in exposition]
        if missing:
            raise SmokeFailure(f"/metrics lacks {missing}")

    return SmokeResult(name, d_input, d_output, int(streamed.shape[0]), diff, stream_seconds,
                       predict_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for /readyz")
    args = parser.parse_args(argv)
    try:
        result = run_smoke(args.url, timeout=args.timeout)
    except (SmokeFailure, ClientError, StreamError, httpx.HTTPError, OSError) as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    print("smoke: ok " + json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
