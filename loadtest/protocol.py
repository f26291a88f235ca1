"""The stream wire format of API.md, from the client's side: start, frames, replies."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

INT16_SCALE = 32768.0


def start_message(wire: str, sample_rate: float | None) -> str:
    """The session's opening `start` text message."""
    msg: dict = {"type": "start", "dtype": "int16" if wire == "int16" else "float32"}
    if sample_rate is not None:
        msg["sample_rate"] = sample_rate
    msg["output"] = "every"
    return json.dumps(msg)


def as_seen_by_server(signal: np.ndarray, wire: str) -> np.ndarray:
    """The float32 values the server will decode: int16 frames lose precision on the wire."""
    if wire != "int16":
        return signal.astype(np.float32)
    return to_int16(signal).astype(np.float32) / INT16_SCALE


def to_int16(signal: np.ndarray) -> np.ndarray:
    return np.clip(np.round(signal * INT16_SCALE), -32768, 32767).astype("<i2")


def encode_binary(signal: np.ndarray, wire: str) -> bytes:
    """Little-endian, channel-interleaved bytes of a (L, d_input) block."""
    if wire == "int16":
        return to_int16(signal).tobytes()
    return np.ascontiguousarray(signal, dtype="<f4").tobytes()


def encode_json_frame(block: np.ndarray) -> str:
    return json.dumps({"type": "samples", "data": block.tolist()})


@dataclass(slots=True)
class Reply:
    """One decoded server message in a frame's reply slot (or a control message)."""

    kind: str  # "outputs" | "error" | "control"
    values: np.ndarray | None = None  # (rows, d_output) float32, when kind == "outputs"
    rows: int = 0
    seq: int | None = None
    t: int | None = None
    code: str | None = None
    message: dict | None = None
    malformed: bool = False


def decode_binary_reply(data: bytes, d_output: int, keep_values: bool) -> Reply:
    """A binary reply: float32 rows of d_output values; flags a byte count that does not fit."""
    row_bytes = 4 * d_output
    if len(data) % row_bytes:
        return Reply("outputs", rows=len(data) // row_bytes, malformed=True)
    values = np.frombuffer(data, dtype="<f4").reshape(-1, d_output) if keep_values else None
    return Reply("outputs", values=values, rows=len(data) // row_bytes)


def decode_text_reply(text: str, d_output: int, keep_values: bool) -> Reply:
    """A text message: JSON outputs, an error in a frame's slot, or a control answer."""
    try:
        msg = json.loads(text)
        kind = msg["type"]
    except (ValueError, KeyError, TypeError):
        return Reply("outputs", malformed=True)
    if kind == "error":
        return Reply("error", code=str(msg.get("code", "unknown")), message=msg)
    if kind != "outputs":
        return Reply("control", message=msg)
    try:
        values = np.asarray(msg["data"], dtype=np.float32)
    except (ValueError, TypeError):
        return Reply("outputs", malformed=True, seq=msg.get("seq"), t=msg.get("t"))
    good = values.ndim == 2 and values.shape[1] == d_output
    return Reply(
        "outputs",
        values=values if keep_values and good else None,
        rows=values.shape[0] if values.ndim else 0,
        seq=msg.get("seq"),
        t=msg.get("t"),
        malformed=not good,
    )
