"""Small client helpers shared by the server tests (real sockets: websockets + httpx)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import websockets


async def connect(ws_url: str, model: str, **kwargs):
    return await websockets.connect(f"{ws_url}/v1/models/{model}/stream", max_size=None,
                                    **kwargs)


async def start(ws, **options) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "start", **options}))
    return json.loads(await ws.recv())


async def send_json(ws, message: dict) -> dict:
    await ws.send(json.dumps(message))
    return json.loads(await ws.recv())


async def stream_binary(ws, frames: list[np.ndarray], d_output: int, dtype="<f4") -> np.ndarray:
    """Send every frame first (pipelined), then read one reply per frame."""
    for frame in frames:
        await ws.send(np.ascontiguousarray(frame, dtype=dtype).tobytes())
    replies = [await ws.recv() for _ in frames]
    return np.concatenate([np.frombuffer(r, "<f4").reshape(-1, d_output) for r in replies])


async def stream_json(ws, frames: list[np.ndarray]) -> list[dict]:
    for frame in frames:
        await ws.send(json.dumps({"type": "samples", "data": frame.tolist()}))
    return [json.loads(await ws.recv()) for _ in frames]


def predict(url: str, model: str, inputs: np.ndarray, **options) -> dict[str, Any]:
    answer = httpx.post(f"{url}/v1/models/{model}/predict",
                        json={"inputs": inputs.tolist(), **options}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def random_splits(rng: np.random.Generator, length: int, most: int = 40) -> list[int]:
    """Cut points that split `length` samples into random-size chunks."""
    cuts, at = [], 0
    while at < length:
        at = min(length, at + int(rng.integers(1, most)))
        cuts.append(at)
    return cuts[:-1]
