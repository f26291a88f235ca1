"""Predict request bodies (JSON or .npy) in, answers (JSON or .npy) out."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.lib import format as npy_format
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


def parse_json(body: bytes, d_input: int, max_steps: int | None = None) -> PredictRequest:
    """A JSON body. `max_steps` (batch x length): refused with 413 before the body is parsed
    when it must hold more numbers, since parsing costs ~30x the body's size in memory."""
    least = least_json_numbers(body)
    if max_steps is not None and least > max_steps * d_input:
        raise ServeError("too_large", f"the body holds at least {least} numbers, over the "
                         f"limit of batch x length {max_steps} (x {d_input} inputs)")
    try:
        request = PredictBody.model_validate_json(body, strict=True)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ServeError("bad_request", "body is not valid JSON") from exc
        raise SchemaError(_schema_errors(exc)) from exc
    if request.inputs is None:
        raise SchemaError([{"loc": ["body", "inputs"], "msg": "Field required"}])
    # booleans among the inputs are only possible with a `true`/`false` that is not
    # return_state's: a scan of every number is spared otherwise
    words = body.count(b"true") + body.count(b"false") - (b'"return_state"' in body)
    inputs = shape_inputs(to_float_array(request.inputs, booleans=words > 0), d_input)
    return PredictRequest(
        finite_float32(inputs), request.sample_rate, request.outputs,
        request.return_state, request.state,
    )


def least_json_numbers(body: bytes) -> int:
    """A lower bound on the numbers in a valid request body, from two byte counts. In a valid
    body (one object, no empty array) an array's commas are its items less one and the
    object's its members less one, so commas = numbers + strings in arrays + keys - 2, and
    numbers >= commas + 2 - strings. A string holding commas could only overstate it in a body
    that is invalid anyway."""
    return body.count(b",") + 2 - body.count(b'"') // 2


def _schema_errors(exc: ValidationError) -> list[dict]:
    """Pydantic's errors without the offending values: they may be NaN (not JSON) or as
    large as the body."""
    return [{k: v for k, v in e.items() if k != "input"}
            for e in exc.errors(include_url=False, include_context=False)]


def parse_npy(body: bytes, query: dict[str, str], d_input: int,
              max_steps: int | None = None) -> PredictRequest:
    array = read_npy(body, max_steps)
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
        raise SchemaError(_schema_errors(exc)) from exc
    return PredictRequest(inputs, body_model.sample_rate, body_model.outputs,
                          body_model.return_state)


def read_npy(body: bytes, max_steps: int | None = None) -> np.ndarray:
    """An .npy body as a float32, float64 or int16 array (native byte order). Its header is
    checked before anything is allocated: the dtype, the size against the bytes that follow,
    and batch x length (the first two dimensions) against `max_steps` (413)."""
    stream = io.BytesIO(body)
    try:
        version = npy_format.read_magic(stream)
    except ValueError:
        raise ServeError("bad_request", "body is not an .npy file (no .npy magic string)") from None
    if version not in ((1, 0), (2, 0)):
        raise ServeError("bad_request", f".npy format version {version} is not supported: "
                         "write version 1.0 or 2.0 (numpy.save does)")
    read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                   else npy_format.read_array_header_2_0)
    try:
        shape, fortran, dtype = read_header(stream)
    except ValueError as exc:
        raise ServeError("bad_request", f"the .npy header is not readable: {exc}") from None
    native = dtype.newbyteorder("=")
    if dtype.hasobject or native not in (np.float32, np.float64, np.int16):
        raise ServeError("bad_dtype", f"npy dtype must be float32, float64 or int16, not {dtype}")
    if max_steps is not None and len(shape) >= 2 and shape[0] * shape[1] > max_steps:
        raise ServeError("too_large", f"batch x length {shape[0] * shape[1]} is over the limit "
                         f"{max_steps}")
    if any(n < 0 for n in shape) or (0 not in shape and max(shape, default=0) > len(body)):
        raise ServeError("bad_request", f"the .npy header's shape {shape} is not possible")
    count, offset = math.prod(shape), stream.tell()
    data, size = len(body) - offset, count * dtype.itemsize
    if data > size:
        raise ServeError("bad_request", f"{data - size} bytes after the .npy array")
    if data < size:
        raise ServeError("bad_request", f"the .npy header describes {size} bytes of data, the "
                         f"body has {data}")
    array = np.frombuffer(body, dtype, count, offset).reshape(shape, order="F" if fortran else "C")
    return array.astype(native, copy=False)


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


def npy_file(shape: tuple[int, ...], allocate: Callable[[int], np.ndarray] | None = None
             ) -> tuple[memoryview, np.ndarray]:
    """The bytes of an .npy file of little-endian float32 of this shape, in `allocate(n)`'s n
    bytes if given, and the array inside them, to be filled (its data is not initialised)."""
    head = io.BytesIO()
    npy_format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False,
                                             "shape": tuple(shape)})
    prefix = head.getvalue()
    count = math.prod(shape)
    size = len(prefix) + 4 * count
    out = allocate(size) if allocate else np.empty(size, np.uint8)
    out[:len(prefix)] = np.frombuffer(prefix, np.uint8)
    return memoryview(out), out[len(prefix):].view("<f4").reshape(shape)


def npy_bytes(array: np.ndarray,
              allocate: Callable[[int], np.ndarray] | None = None) -> memoryview:
    """The .npy file of `array` as float32, made with one copy of the data (np.save into a
    BytesIO took three: 44 ms for a 41 MB answer), into `allocate(n)`'s n bytes if given."""
    body, data = npy_file(array.shape, allocate)
    data[...] = array
    return body
