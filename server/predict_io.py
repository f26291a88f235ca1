"""Predict request bodies (JSON or .npy) in, answers (JSON or .npy) out."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from client.wire import INT16_SCALE
from server.errors import ServeError
from server.protocol import finite_float32, to_float_array

NPY_TYPE = "application/x-npy"


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Any = Field(description="batch × length × d_input numbers (nested lists), or "
                        "batch × length when d_input is 1")
    sample_rate: float | None = None
    outputs: Literal["all", "last"] = "all"
    return_state: bool = False
    state: list[str] | None = None


@dataclass
class PredictRequest:
    inputs: np.ndarray  # (batch, length, d_input) float32
    sample_rate: float | None = None
    outputs: str = "all"
    return_state: bool = False
    state: list[str] | None = None


class SchemaError(Exception):
    def __init__(self, errors: list[dict]) -> None:
        super().__init__("request does not match the schema")
        self.errors = errors


def parse_json(body: bytes, d_input: int) -> PredictRequest:
    try:
        request = PredictBody.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ServeError("bad_request", "body is not valid JSON") from exc
        raise SchemaError(exc.errors(include_url=False, include_context=False)) from exc
    if request.inputs is None:
        raise SchemaError([{"loc": ["body", "inputs"], "msg": "Field required"}])
    inputs = shape_inputs(to_float_array(request.inputs), d_input)
    return PredictRequest(
        finite_float32(inputs), request.sample_rate, request.outputs,
        request.return_state, request.state,
    )


def parse_npy(body: bytes, query: dict[str, str], d_input: int) -> PredictRequest:
    stream = io.BytesIO(body)
    try:
        array = np.load(stream, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for malformed files
        raise ServeError("bad_request", f"body is not a readable .npy file: {exc}") from exc
    if stream.tell() != len(body):
        raise ServeError("bad_request", f"{len(body) - stream.tell()} bytes after the .npy array")
    native = array.dtype.newbyteorder("=")  # the .npy header names the byte order
    if native not in (np.float32, np.float64, np.int16):
        raise ServeError(
            "bad_dtype", f"npy dtype must be float32, float64 or int16, not {native}"
        )
    array = array.astype(native, copy=False)
    scale = 1.0 / INT16_SCALE if array.dtype == np.int16 else 1.0
    inputs = finite_float32(shape_inputs(array, d_input), scale=scale)
    try:
        body_model = PredictBody(
            inputs=None,
            sample_rate=query.get("sample_rate") or None,
            outputs=query.get("outputs") or "all",
            return_state=query.get("return_state") or False,
        )
    except ValidationError as exc:
        raise SchemaError(exc.errors(include_url=False, include_context=False)) from exc
    return PredictRequest(inputs, body_model.sample_rate, body_model.outputs,
                          body_model.return_state)


def shape_inputs(array: np.ndarray, d_input: int) -> np.ndarray:
    """(batch, length, d_input), or (batch, length) when d_input is 1."""
    if array.ndim == 2 and d_input == 1:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] != d_input:
        raise ServeError(
            "bad_shape",
            f"inputs must have shape (batch, length, {d_input})"
            + (" or (batch, length)" if d_input == 1 else "")
            + f", got {tuple(array.shape)}",
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ServeError("bad_shape", "inputs need at least one sequence of one sample")
    return array


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype="<f4"), allow_pickle=False)
    return buffer.getvalue()
