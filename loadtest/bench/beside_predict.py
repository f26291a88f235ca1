"""Streams while the largest predict the default limits accept runs beside them: the stream
p99 with and without it, in one run (the predict path must not stall the step path)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np

BODY_BYTES = 60 << 20  # just under max_body_bytes (64 MiB)


def maximal_body(d_input: int, quick: bool) -> tuple[bytes, tuple[int, int, int]]:
    """A JSON predict body of about BODY_BYTES (random numbers, 6 significant digits)."""
    batch = 2 if quick else 16
    length = 500 if quick else BODY_BYTES // (11 * d_input * batch)
    rng = np.random.default_rng(0)
    inputs = np.round(rng.standard_normal((batch, length, d_input)), 5)
    return json.dumps({"inputs": inputs.tolist()}).encode(), (batch, length, d_input)


def beside_predict(url: str, model: str, d_input: int, stream, quick: bool) -> dict:
    """`stream(seconds)` runs a stream load and returns its summary (server_bench._stream)."""
    hold_s = 2.0 if quick else 20.0
    body, shape = maximal_body(d_input, quick)
    baseline = stream(hold_s)
    answer: dict = {}

    def post() -> None:
        time.sleep(1.0 if quick else 3.0)  # into the hold
        began = time.perf_counter()
        reply = httpx.post(f"{url}/v1/models/{model}/predict", content=body, timeout=300,
                           headers={"Content-Type": "application/json"})
        answer.update(status=reply.status_code, seconds=time.perf_counter() - began)

    poster = threading.Thread(target=post)
    poster.start()
    during = stream(hold_s)
    poster.join()
    return {"body_mb": len(body) / 2**20, "shape": list(shape), "predict": answer,
            "baseline": baseline, "during": during,
            "p99_ms": {"baseline": baseline["latency_hold_ms"]["p99"],
                       "during": during["latency_hold_ms"]["p99"]}}
