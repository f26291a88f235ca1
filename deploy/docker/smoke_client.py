"""End-to-end check of a running s4serve: readiness, one streaming session, one predict.

deploy/docker/smoke.sh runs it against the container; tests/deploy uses it to put real traffic
on a server before Prometheus scrapes it. Needs only s4serve's own dependencies (httpx,
websockets, numpy). Exits non-zero, with the reason, on the first thing that is wrong.

    python deploy/docker/smoke_client.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np
import websockets

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


async def stream_session(
    ws_url: str, d_input: int, d_output: int, frames: np.ndarray
) -> np.ndarray:
    """Streams `frames` (n_frames, T, d_input) as binary float32 frames; returns the outputs
    (n_frames * T, d_output) in order."""
    outputs = []
    async with websockets.connect(ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "dtype": "float32", "output": "every"}))
        started = json.loads(await ws.recv())
        if started.get("type") != "started" or started.get("d_input") != d_input:
            raise SmokeFailure(f"unexpected start answer: {started}")
        for frame in frames:
            await ws.send(np.ascontiguousarray(frame, dtype="<f4").tobytes())
            reply = await ws.recv()
            if isinstance(reply, str):
                raise SmokeFailure(f"text reply to a binary frame: {reply}")
            outputs.append(np.frombuffer(reply, dtype="<f4").reshape(len(frame), d_output))
        await ws.send(json.dumps({"type": "end"}))
        end = json.loads(await ws.recv())
        expected = frames.shape[0] * frames.shape[1]
        if end.get("type") != "end" or end.get("samples") != expected:
            raise SmokeFailure(f"end answer {end}, expected samples={expected}")
    return np.concatenate(outputs)


def predict(client: httpx.Client, name: str, inputs: np.ndarray) -> np.ndarray:
    answer = client.post(f"/v1/models/{name}/predict", json={"inputs": inputs.tolist()})
    if answer.status_code != 200:
        raise SmokeFailure(f"predict answered {answer.status_code}: {answer.text[:300]}")
    return np.asarray(answer.json()["outputs"], dtype=np.float64)


def run_smoke(base_url: str, timeout: float = 120.0, n_frames: int = 4, frame_len: int = 16,
              seed: int = 0) -> SmokeResult:
    """Waits for readiness, streams one session and predicts the same samples in one request
    through the first served model; the two views must agree (the contract says they do)."""
    base_url = base_url.rstrip("/")
    wait_ready(base_url, timeout)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        models = client.get("/v1/models").json()["models"]
        if not models:
            raise SmokeFailure("the server is ready but serves no model")
        info = models[0]
        name, d_input, d_output = info["name"], info["d_input"], info["d_output"]
        rng = np.random.default_rng(seed)
        frames = (0.5 * rng.standard_normal((n_frames, frame_len, d_input))).astype(np.float32)

        ws_url = base_url.replace("http", "ws", 1) + f"/v1/models/{name}/stream"
        began = time.perf_counter()
        streamed = asyncio.run(stream_session(ws_url, d_input, d_output, frames))
        stream_seconds = time.perf_counter() - began

        began = time.perf_counter()
        whole = predict(client, name, frames.reshape(1, -1, d_input))[0]
        predict_seconds = time.perf_counter() - began

        if whole.shape != streamed.shape or not np.isfinite(streamed).all():
            raise SmokeFailure(f"stream {streamed.shape} vs predict {whole.shape}, or non-finite")
        diff = float(np.max(np.abs(whole - streamed)))
        scale = max(1.0, float(np.max(np.abs(whole))))
        if diff > 2e-3 * scale:
            raise SmokeFailure(f"stream and predict disagree by {diff:.3g} (scale {scale:.3g})")

        exposition = client.get("/metrics").text
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
    except (SmokeFailure, httpx.HTTPError, websockets.WebSocketException, OSError) as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    print("smoke: ok " + json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
