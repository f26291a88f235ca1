"""Properties of the pure parsers: whatever a client sends, the answer is a value or a
ServeError with a documented code, never another exception."""

from __future__ import annotations

import base64
import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from server.errors import HTTP_STATUS, ServeError
from server.protocol import binary_frame, json_samples, parse_start, parse_text
from server.state_blob import StateRecord, decode_state, encode_state
from tests import fuzz_budget  # noqa: F401  (the examples budget)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=30,
)
START_KEYS = ["type", "dtype", "sample_rate", "output", "state", "resume", "extra"]


def documented(exc: ServeError) -> bool:
    return exc.code in HTTP_STATUS


@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_any_text_message_is_a_dict_with_a_type_or_a_documented_error(text):
    try:
        message = parse_text(text)
    except ServeError as exc:
        assert documented(exc)
        return
    assert isinstance(message, dict) and isinstance(message["type"], str)


@given(st.dictionaries(st.sampled_from(START_KEYS), json_values, max_size=6))
def test_any_start_is_options_or_a_documented_error(fields):
    try:
        options = parse_start({**fields, "type": "start"})
    except ServeError as exc:
        assert documented(exc)
        return
    assert options.dtype in ("float32", "int16") and options.output in ("every", "last")
    assert options.state is None or options.resume is None


@given(st.binary(max_size=256), st.sampled_from(["float32", "int16"]), st.integers(1, 7))
def test_any_binary_frame_is_samples_or_a_documented_error(data, dtype, d_input):
    try:
        samples = binary_frame(data, dtype, d_input)
    except ServeError as exc:
        assert exc.code in ("bad_shape", "non_finite")
        return
    assert samples.dtype == np.float32 and samples.shape[1] == d_input
    assert len(samples) == 1 or np.isfinite(samples).all()


@given(json_values, st.integers(1, 4))
def test_any_json_samples_are_finite_float32_or_a_documented_error(data, d_input):
    try:
        samples = json_samples({"type": "samples", "data": data}, d_input)
    except ServeError as exc:
        assert exc.code in ("bad_shape", "bad_dtype", "non_finite")
        return
    assert samples.dtype == np.float32 and samples.shape[1] == d_input
    assert np.isfinite(samples).all()


def _record() -> StateRecord:
    tensors = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float64)]
    return StateRecord("m", "1", 7, tensors, ["a", "b"], 16000.0)


@given(st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_any_bytes_are_a_state_or_bad_state(raw):
    for blob in (base64.b64encode(raw).decode(), raw.decode("latin-1")):
        try:
            decode_state(blob)
        except ServeError as exc:
            assert exc.code == "bad_state"


@given(st.integers(0, 2000), st.integers(0, 255), st.sampled_from([None, "k"]))
def test_a_damaged_state_is_bad_state_or_still_well_formed(position, value, secret):
    raw = bytearray(base64.b64decode(encode_state(_record(), secret)))
    raw[position % len(raw)] = value
    try:
        record = decode_state(base64.b64encode(bytes(raw)).decode(), secret)
    except ServeError as exc:
        assert exc.code == "bad_state"
        return
    assert secret is None or bytes(raw) == base64.b64decode(encode_state(_record(), secret))
    assert all(np.isfinite(t).all() for t in record.tensors) and record.samples >= 0
