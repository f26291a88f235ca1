"""The state blob: a versioned binary record of one session's recurrent state.

Layout (all integers little-endian):

    b"S4SB" | u16 format version | u32 header length | header (UTF-8 JSON) | tensor bytes
    [ | 32-byte HMAC-SHA256 of everything before it ]     (format 2: signed)

The header names the model, its version, the sample count, the sample rate the state was
advanced at, and each tensor's name, dtype and shape; the tensor bytes follow in that order,
C-contiguous little-endian. Clients carry it as standard base64 text.

With a `state_secret` the server signs every blob it issues (format 2) and accepts only blobs
whose signature checks, before it reads anything else in them; without one it issues format 1
and accepts both (a format-2 blob's signature is then not checked).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from server.errors import ServeError

MAGIC = b"S4SB"
FORMAT_VERSION, SIGNED_VERSION = 1, 2
_TAG = 32  # bytes of HMAC-SHA256
_NATIVE_LE = sys.byteorder == "little"
_PREFIX = struct.Struct("<4sHI")
_ALLOWED_DTYPES = {"float32", "float64", "complex64", "complex128", "int64"}


@dataclass(frozen=True)
class TensorSpec:
    """One state tensor of a model: name, shape without the batch axis, numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class StateRecord:
    model: str
    version: str
    samples: int
    tensors: list[np.ndarray]
    names: list[str] = field(default_factory=list)
    sample_rate: float | None = None

    def check(self, model: str, version: str, spec: Sequence[TensorSpec]) -> None:
        """Reject a record made by another model, version or state layout."""
        if (self.model, self.version) != (model, version):
            raise ServeError(
                "bad_state",
                f"state was made by model {self.model!r} version {self.version!r}, "
                f"not {model!r} version {version!r}",
            )
        expected = [(s.name, tuple(s.shape), s.dtype) for s in spec]
        got = [(n, t.shape, t.dtype.name) for n, t in zip(self.names, self.tensors, strict=True)]
        if expected != got:
            raise ServeError("bad_state", "state tensors do not match this model's state layout")


def _tag(secret: str, *pieces: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of the pieces, as of their concatenation."""
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    for piece in pieces:
        mac.update(piece)
    return mac.digest()


@functools.cache
def _dtype_name(dtype: np.dtype) -> str:
    return dtype.name  # computed by numpy at each call, ~10 us: a checkpoint pass has many


def encode_state_raw(record: StateRecord, secret: str | None = None) -> bytes:
    """Serialise a record to bytes; signed when there is a secret."""
    arrays = [np.ascontiguousarray(t) for t in record.tensors]
    header = {
        "model": record.model,
        "version": record.version,
        "samples": int(record.samples),
        "sample_rate": record.sample_rate,
        "tensors": [
            {"name": name, "dtype": _dtype_name(a.dtype), "shape": list(a.shape)}
            for name, a in zip(record.names, arrays, strict=True)
        ],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(a.tobytes() if _NATIVE_LE and a.dtype.isnative
                    else a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays)
    version = SIGNED_VERSION if secret else FORMAT_VERSION
    raw = _PREFIX.pack(MAGIC, version, len(head)) + head + body
    if secret:
        raw += _tag(secret, raw)
    return raw


def encode_state(record: StateRecord, secret: str | None = None) -> str:
    """Serialise a record to base64 text (what clients carry); signed when there is a secret."""
    return base64.b64encode(encode_state_raw(record, secret)).decode("ascii")


class BlobWriter:
    """The raw blobs of many sessions of one model at once, byte for byte what
    `encode_state_raw` writes, from their flat state rows (model/fused.py `StateLayout`): the
    header is a template per sample rate with the sample count left open, and the tensor
    bytes are views of the rows, which a store copies where they go (server/local_store.py
    copies a slice's rows into their slab halves at once). One by one a blob cost ~50 us."""

    def __init__(self, model: str, version: str, layout, secret: str | None = None) -> None:
        self.model, self.version, self.layout, self.secret = model, version, layout, secret
        self._heads: dict[float | None, tuple[bytes, bytes]] = {}
        self._segments = [(wide, start, math.prod(shape), "float64" if wide else "float32")
                          for shape, wide, start in zip(layout.shapes, layout.wide,
                                                        layout.offsets, strict=True)]

    def _head(self, sample_rate: float | None) -> tuple[bytes, bytes]:
        """The header's bytes before and after the sample count."""
        if sample_rate not in self._heads:
            tensors = [{"name": name, "dtype": dtype, "shape": list(shape)}
                       for name, shape, (_, _, _, dtype) in zip(
                           self.layout.names, self.layout.shapes, self._segments, strict=True)]
            header = {"model": self.model, "version": self.version, "samples": 0,
                      "sample_rate": sample_rate, "tensors": tensors}
            before, after = json.dumps(header, separators=(",", ":")).split('"samples":0', 1)
            self._heads[sample_rate] = ((before + '"samples":').encode(), after.encode())
        return self._heads[sample_rate]

    def _runs(self) -> list[tuple[bool, int, int]]:
        """(wide, start, size) of the tensors in blob order, neighbours in one flat array
        merged: the rows' bytes are cut in as few pieces as the layout allows."""
        runs: list[list] = []
        for wide, start, size, _ in self._segments:
            if runs and runs[-1][0] == wide and runs[-1][1] + runs[-1][2] == start:
                runs[-1][2] += size
            else:
                runs.append([wide, start, size])
        return [tuple(run) for run in runs]

    def blob_rows(self, samples: Sequence[int], rates: Sequence[float | None],
                  flat32: np.ndarray, flat64: np.ndarray
                  ) -> tuple[list[bytes], list[np.ndarray], list[bytes]]:
        """The blobs of sessions whose rows are flat32 (B, W32) and flat64 (B, W64), as
        (heads, parts, tails): session i's blob, byte for byte what `encode_state_raw` writes,
        is heads[i], then row i of each part (uint8 (B, n) views of the rows, no copy), then
        tails[i] (its signature, or nothing)."""
        if not _NATIVE_LE:  # the template writes native bytes: keep the general path
            blobs = [encode_state_raw(StateRecord(
                self.model, self.version, n, [v[0] for v in self.layout.split(
                    flat32[i:i + 1], flat64[i:i + 1])], list(self.layout.names), rate),
                self.secret) for i, (n, rate) in enumerate(zip(samples, rates, strict=True))]
            return blobs, [np.zeros((len(blobs), 0), np.uint8)], [b""] * len(blobs)
        parts = [(flat64 if wide else flat32)[:, start:start + size].view(np.uint8)
                 for wide, start, size in self._runs()]
        version = SIGNED_VERSION if self.secret else FORMAT_VERSION
        heads, tails = [], []
        for i, (n, rate) in enumerate(zip(samples, rates, strict=True)):
            before, after = self._head(rate)
            head = before + str(int(n)).encode() + after
            heads.append(_PREFIX.pack(MAGIC, version, len(head)) + head)
            tails.append(_tag(self.secret, heads[i], *(part[i] for part in parts))
                         if self.secret else b"")
        return heads, parts, tails


def decode_state(blob: object, secret: str | None = None) -> StateRecord:
    """Parse base64 text into a record; any malformation, and with a secret any blob this
    server did not sign, is `bad_state`."""
    if not isinstance(blob, str):
        raise ServeError("bad_state", "state must be a base64 string")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServeError("bad_state", "state is not valid base64") from exc
    return decode_state_raw(raw, secret)


def decode_state_raw(raw: bytes, secret: str | None = None) -> StateRecord:
    """Parse a record's bytes (as `decode_state`, without the base64)."""
    try:
        return _parse(_verified(raw, secret))
    except ServeError:
        raise
    except (ValueError, KeyError, TypeError, struct.error, OverflowError,
            RecursionError) as exc:
        raise ServeError("bad_state", f"state record is malformed: {exc}") from exc


def _verified(raw: bytes, secret: str | None) -> bytes:
    """The record without its signature, once the signature (if any is needed) checks."""
    if len(raw) < _PREFIX.size:
        raise ServeError("bad_state", "state record is truncated")
    magic, version, _ = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise ServeError("bad_state", "not an s4serve state record")
    if version not in (FORMAT_VERSION, SIGNED_VERSION):
        raise ServeError("bad_state", f"state record format {version} is not supported")
    if version == FORMAT_VERSION:
        if secret:
            raise ServeError("bad_state", "unsigned state: this server accepts only states it "
                             "issued (signed)")
        return raw
    if len(raw) < _PREFIX.size + _TAG:
        raise ServeError("bad_state", "state record is truncated")
    body, tag = raw[:-_TAG], raw[-_TAG:]
    if secret and not hmac.compare_digest(tag, _tag(secret, body)):
        raise ServeError("bad_state", "state signature does not match: not issued by this "
                         "server (or its state_secret changed)")
    return body


def _parse(raw: bytes) -> StateRecord:
    _, _, head_len = _PREFIX.unpack_from(raw)
    head_end = _PREFIX.size + head_len
    header = json.loads(raw[_PREFIX.size : head_end].decode())
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ServeError("bad_state", "state record header is malformed")
    offset = head_end
    names: list[str] = []
    tensors: list[np.ndarray] = []
    for entry in header["tensors"]:
        dtype_name = str(entry["dtype"])
        if dtype_name not in _ALLOWED_DTYPES:
            raise ServeError("bad_state", f"state tensor dtype {dtype_name!r} is not supported")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        shape = entry["shape"]
        # every field's type and range is checked before anything is allocated
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                type(n) is int and 0 <= n < 1 << 31 for n in shape):
            raise ServeError("bad_state", "state tensor shape must be a short list of small "
                             "non-negative integers")
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > len(raw):
            raise ServeError("bad_state", "state record is truncated")
        array = np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise ServeError("bad_state", "state tensor holds NaN or Inf")
        tensors.append(array.reshape(shape).astype(dtype.newbyteorder("="), copy=True))
        names.append(str(entry["name"]))
        offset += nbytes
    if offset != len(raw):
        raise ServeError("bad_state", "state record has trailing bytes")
    rate, samples = header.get("sample_rate"), header.get("samples")
    if type(samples) is not int or not 0 <= samples < 1 << 62:
        raise ServeError("bad_state", "state record's samples must be a non-negative integer")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                             or not 0 < rate < float("inf")):
        raise ServeError("bad_state", "state record's sample_rate must be a positive number")
    return StateRecord(
        model=str(header["model"]),
        version=str(header["version"]),
        samples=samples,
        tensors=tensors,
        names=names,
        sample_rate=None if rate is None else float(rate),
    )
