"""The wire format, defined once: the server, the client library and the load tester all import
these constants and codecs (docs/protocol.md describes them). Pure numpy + struct."""

from __future__ import annotations

import functools
import json
import struct
from typing import Any

import numpy as np

# ----- streams -------------------------------------------------------------------------
WIRE_DTYPES = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}
INT16_SCALE = 32768.0  # an int16 sample k stands for k / 32768
OUTPUT_MODES = ("every", "last")
# close codes after which a client should reconnect and resume: going away, lost, internal,
# service restart, try again later
RETRY_CLOSE_CODES = frozenset({1001, 1005, 1006, 1011, 1012, 1013})


def to_int16(signal: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1) to int16 wire samples (rounded, clipped)."""
    return np.clip(np.round(np.asarray(signal) * INT16_SCALE), -32768, 32767).astype("<i2")


def from_int16(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) * np.float32(1.0 / INT16_SCALE)


def frame_bytes(frame: np.ndarray, dtype: str = "float32") -> bytes:
    """A binary frame (little-endian, channel-interleaved) for a (T, d_input) block: int16
    sessions take int16 samples as they are, or floats in [-1, 1) scaled to int16; float32
    sessions take any numbers."""
    array = np.asarray(frame)
    if dtype == "int16" and array.dtype.kind == "f":
        return to_int16(array).tobytes()
    return np.ascontiguousarray(array, dtype=WIRE_DTYPES[dtype]).tobytes()


def as_seen_by_server(signal: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """The float32 values the server decodes from `frame_bytes(signal, dtype)` of floats."""
    if dtype == "int16":
        return from_int16(to_int16(signal))
    return np.asarray(signal, dtype=np.float32)


def json_frame(block: np.ndarray) -> str:
    """A JSON `samples` frame (the text alternative to a binary frame)."""
    return json.dumps({"type": "samples", "data": np.asarray(block).tolist()})


def start_message(dtype: str = "float32", output: str = "every",
                  sample_rate: float | None = None, state: str | None = None,
                  resume: str | None = None, received: int | None = None) -> str:
    """The `start` text message that opens (or resumes) a stream session; `received`: the
    replies a resuming client got, so that the server sends again those it missed."""
    message: dict[str, Any] = {"type": "start", "dtype": dtype, "output": output}
    if sample_rate is not None:
        message["sample_rate"] = sample_rate
    if resume is not None:
        message["resume"] = resume
        if received is not None:
            message["received"] = received
    elif state is not None:
        message["state"] = state
    return json.dumps(message)


# ----- WebSocket frames (RFC 6455), for the sides that frame messages themselves ---------
def ws_header(opcode: int, size: int, mask: bool = False) -> bytes:
    """Header of a final frame of `size` payload bytes: the masked form (a client's) is
    followed by its 4-byte key."""
    first, flag = 0x80 | opcode, 0x80 if mask else 0
    if size < 126:
        return bytes((first, flag | size))
    if size < 1 << 16:
        return struct.pack("!BBH", first, flag | 126, size)
    return struct.pack("!BBQ", first, flag | 127, size)


def ws_length(buf: bytes, at: int) -> tuple[int, int] | None:
    """(payload size, end of the length field) of the frame starting at buf[at]; the mask key
    (if any) and the payload follow. None while its header is not complete."""
    end, size = len(buf), (buf[at + 1] & 0x7F if len(buf) - at >= 2 else -1)
    if size < 0:
        return None
    if size == 126:
        return (int.from_bytes(buf[at + 2:at + 4], "big"), at + 4) if end - at >= 4 else None
    if size == 127:
        return (int.from_bytes(buf[at + 2:at + 10], "big"), at + 10) if end - at >= 10 else None
    return size, at + 2


# ----- mux, format v1 ------------------------------------------------------------------
MUX_VERSION, KIND_DATA, KIND_OUTPUTS = 1, 1, 2
HEADER = struct.Struct("<BBHII")  # version, kind, reserved, seq, count
ENTRY_IN = struct.Struct("<II")  # session, samples
ENTRY_OUT = struct.Struct("<IHHI")  # session, status, reserved, rows
STATUS = {"ok": 0, "unknown_session": 1, "bad_shape": 2, "non_finite": 3, "overloaded": 4,
          "internal": 5, "bad_dtype": 6}
STATUS_CODES = {number: code for code, number in STATUS.items()}


@functools.cache
def uniform_entries(samples: int, d_input: int) -> np.dtype:
    """A data message's entries as one numpy record each, when all carry `samples` float32
    samples (the usual gateway tick: one)."""
    return np.dtype([("sid", "<u4"), ("T", "<u4"), ("x", "<f4", (samples, d_input))])


@functools.cache
def uniform_outputs(rows: int, d_output: int) -> np.dtype:
    """An outputs message's entries as records, when every one is ok with `rows` rows."""
    return np.dtype([("sid", "<u4"), ("status", "<u2"), ("res", "<u2"), ("rows", "<u4"),
                     ("y", "<f4", (rows, d_output))])


def encode_data(seq: int, entries: list[tuple[int, bytes, int]]) -> bytes:
    """A mux data message: (session, payload bytes, samples) per entry."""
    parts = [HEADER.pack(MUX_VERSION, KIND_DATA, 0, seq, len(entries))]
    for sid, payload, samples in entries:
        parts += [ENTRY_IN.pack(sid, samples), payload]
    return b"".join(parts)


def decode_outputs(data: bytes, d_output: int) -> tuple[int, list[tuple[int, int, Any]]]:
    """A mux outputs message: (seq, [(session, status, (rows, d_output) float32 or None)])."""
    version, kind, _, seq, count = HEADER.unpack_from(data)
    if version != MUX_VERSION or kind != KIND_OUTPUTS:
        raise ValueError(f"not a v{MUX_VERSION} outputs message (version {version}, kind {kind})")
    if count:  # the common answer, every entry ok with the same rows: one array view
        rows = ENTRY_OUT.unpack_from(data, HEADER.size)[3]
        if len(data) == HEADER.size + count * (ENTRY_OUT.size + 4 * d_output * rows):
            block = np.frombuffer(data, uniform_outputs(rows, d_output), count, HEADER.size)
            if not block["status"].any() and (block["rows"] == rows).all():
                return seq, [(sid, 0, y) for sid, y in zip(block["sid"].tolist(), block["y"],
                                                           strict=True)]
    at, out = HEADER.size, []
    for _ in range(count):
        sid, status, _, rows = ENTRY_OUT.unpack_from(data, at)
        at += ENTRY_OUT.size
        size = rows * d_output * 4
        values = np.frombuffer(data, "<f4", rows * d_output, at).reshape(rows, d_output)
        at += size
        out.append((sid, status, values if status == 0 else None))
    return seq, out
