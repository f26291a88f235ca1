"""Parsing and validation of what clients send; every failure is a documented error code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.wire import OUTPUT_MODES, WIRE_DTYPES, from_int16
from server.errors import ServeError

_START_FIELDS = {"type", "dtype", "sample_rate", "output", "state", "resume", "received"}


@dataclass(frozen=True)
class StartOptions:
    dtype: str = "float32"
    sample_rate: float | None = None
    output: str = "every"
    state: str | None = None
    resume: str | None = None
    received: int | None = None  # with resume: replies the client got (server/replies.py)


def parse_text(text: str) -> dict[str, Any]:
    """A client text message: a JSON object with a string `type`."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ServeError("bad_request", f"message is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise ServeError("bad_request", "message must be a JSON object")
    if not isinstance(message.get("type"), str):
        raise ServeError("bad_request", "message needs a string field 'type'")
    return message


def parse_start(message: dict[str, Any]) -> StartOptions:
    unknown = set(message) - _START_FIELDS
    if unknown:
        raise ServeError("bad_request", f"unknown start fields: {sorted(unknown)}")
    dtype = message.get("dtype") or "float32"
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise ServeError("bad_dtype", f"dtype must be one of {sorted(WIRE_DTYPES)}")
    output = message.get("output") or "every"
    if not isinstance(output, str) or output not in OUTPUT_MODES:
        raise ServeError("bad_request", f"output must be one of {list(OUTPUT_MODES)}")
    for key in ("state", "resume"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise ServeError("bad_request", f"{key} must be a string or null")
    if message.get("state") is not None and message.get("resume") is not None:
        raise ServeError("bad_request", "give either state or resume, not both")
    received = message.get("received")
    if received is not None:
        if type(received) is not int or not 0 <= received < 1 << 62:
            raise ServeError("bad_request", "received must be a non-negative integer")
        if message.get("resume") is None:
            raise ServeError("bad_request", "received goes with resume")
    return StartOptions(
        dtype=dtype,
        sample_rate=message.get("sample_rate"),
        output=output,
        state=message.get("state"),
        resume=message.get("resume"),
        received=received,
    )


def binary_frame(data: bytes, dtype: str, d_input: int) -> np.ndarray:
    """A binary frame: T × d_input little-endian samples, channel-interleaved -> (T, d_input)
    float32. A one-sample float32 frame is not checked for NaN/Inf here: the scheduler checks
    each batch of them (and every output) in one pass, and rejects the bad ones whole."""
    wire = WIRE_DTYPES[dtype]
    row_bytes = d_input * wire.itemsize
    if not data or len(data) % row_bytes:
        raise ServeError(
            "bad_shape",
            f"frame of {len(data)} bytes is not a positive multiple of "
            f"d_input × itemsize = {row_bytes}",
        )
    samples = np.frombuffer(data, dtype=wire).reshape(-1, d_input)
    if dtype == "int16":  # always finite
        return from_int16(samples)
    if len(samples) > 1 and not np.isfinite(samples).all():
        raise ServeError("non_finite", "inputs contain NaN or Inf")
    return samples


def json_samples(message: dict[str, Any], d_input: int) -> np.ndarray:
    """A text frame `{"type": "samples", "data": [[...], ...]}` -> (T, d_input)."""
    data = message.get("data")
    if not isinstance(data, list) or not data:
        raise ServeError("bad_shape", "data must be a non-empty list of T rows")
    array = to_float_array(data)
    if array.ndim == 1 and d_input == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != d_input:
        raise ServeError(
            "bad_shape", f"data must be T rows of {d_input} numbers, got shape {array.shape}"
        )
    return finite_float32(array)


def to_float_array(data: Any, booleans: bool = True) -> np.ndarray:
    """Nested JSON lists -> float64 array; ragged lists and non-numbers are rejected.
    `booleans`: whether `data` may hold true/false, which numpy would read as 1.0 / 0.0 among
    numbers (False spares the scan of every item when the caller knows there are none)."""
    if booleans and any(isinstance(x, bool) for x in leaves(data)):
        raise ServeError("bad_dtype", "arrays must hold numbers (true / false are not)")
    try:
        array = np.asarray(data)
    except ValueError as exc:
        raise ServeError("bad_shape", "arrays must be rectangular (equal-length rows)") from exc
    if array.dtype == object:
        if not all(isinstance(x, list | int | float) and not isinstance(x, bool)
                   for x in leaves(data)):
            raise ServeError("bad_dtype", "arrays must hold numbers")
        try:  # numbers only: ragged, or integers past 64 bits (floats up to 1.8e308 are fine)
            array = np.array(data, dtype=np.float64)
        except OverflowError:
            raise ServeError("non_finite", "a number is too large for float64") from None
        except ValueError:
            raise ServeError("bad_shape", "arrays must be rectangular") from None
    if array.dtype.kind not in "iuf":
        raise ServeError("bad_dtype", "arrays must hold numbers")
    return array.astype(np.float64)


def leaves(data: Any, depth: int = 0):
    """The non-list items of nested lists (for the error code of an object array)."""
    if isinstance(data, list) and depth < 64:
        for item in data:
            yield from leaves(item, depth + 1)
    else:
        yield data


def finite_float32(array: np.ndarray, scale: float = 1.0) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ServeError("non_finite", "inputs contain NaN or Inf")
    out = array.astype(np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    if not np.isfinite(out).all():  # float64 values beyond float32's range
        raise ServeError("non_finite", "inputs overflow float32")
    return out
