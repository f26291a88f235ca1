"""Predict bodies in (server/predict_io.py): limits checked before the body is expanded,
strict types, .npy headers read before any data."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc

import numpy as np
import pytest
import torch

from model.checkpoint import save_model
from model.config import ModelConfig
from model.network import S4Network
from server.backends import load_backend
from server.errors import ServeError
from server.predict_io import (
    SchemaError,
    least_json_numbers,
    npy_bytes,
    parse_json,
    parse_npy,
    read_npy,
)
from server.predict_job import Job, Limits, run_job


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple, fortran: bool = False) -> bytes:
    """A version 1.0 .npy header alone, as a client could send it."""
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def code_of(call) -> str:
    with pytest.raises(ServeError) as caught:
        call()
    return caught.value.code


@pytest.mark.parametrize("body", [
    b'{"inputs": [[1, 2], [3, 4]]}',
    b'{"inputs": [[[1, 2]], [[3, 4]]], "sample_rate": 8000, "outputs": "last"}',
    b'{"state": ["c3RhdGU=", "b3RoZXI="], "inputs": [[[1,2],[3,4]],[[5,6],[7,8]]]}',
    b'{ "inputs" : [ [ 1.5e3 , -2 ] ] , "return_state" : true }',
    b'{"inputs": [[7]]}',
])
def test_the_number_count_is_a_lower_bound_on_valid_bodies(body):
    numbers = np.asarray(json.loads(body)["inputs"]).size
    assert least_json_numbers(body) <= numbers
    assert least_json_numbers(body) >= numbers - 2  # and close: it can refuse in time


def test_a_json_body_over_the_limit_is_refused_before_it_is_parsed():
    rows = b",".join([b"[0.5]"] * 200_000)
    body = b'{"inputs": [[' + rows + b"]]}"  # 200k steps of d_input 1
    tracemalloc.start()
    try:
        assert code_of(lambda: parse_json(body, 1, max_steps=100_000)) == "too_large"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(body) // 4  # parsing it would cost tens of times the body
    assert parse_json(body, 1, max_steps=200_000).inputs.shape == (1, 200_000, 1)


def test_booleans_are_not_numbers():
    assert code_of(lambda: parse_json(b'{"inputs": [[[true, 0.5]]]}', 2)) == "bad_dtype"
    assert code_of(lambda: parse_json(b'{"inputs": [[0.5, false]]}', 1)) == "bad_dtype"
    request = parse_json(b'{"inputs": [[0.5, 1]], "return_state": true}', 1)
    assert request.return_state is True and request.inputs.shape == (1, 2, 1)
    for field in (b'"sample_rate": true', b'"sample_rate": "16000"', b'"return_state": 1',
                  b'"outputs": 3'):
        with pytest.raises(SchemaError):
            parse_json(b'{"inputs": [[0.5]], ' + field + b"}", 1)
    assert parse_json(b'{"inputs": [[0.5]], "sample_rate": 8000}', 1).sample_rate == 8000.0


def test_npy_header_checked_before_any_allocation():
    huge = npy_header("<f8", (1, 10**9, 1))  # 8 GB declared, nothing sent
    tracemalloc.start()
    try:
        assert code_of(lambda: read_npy(huge, max_steps=4_000_000)) == "too_large"
        with pytest.raises(ServeError, match="not possible"):
            read_npy(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(("body", "code", "words"), [
    (npy(np.zeros((1, 4, 1), np.float32))[:-3], "bad_request", "describes 16 bytes"),
    (npy(np.zeros((1, 4, 1), np.float32)) + b"\0", "bad_request", "1 bytes after"),
    (b"not npy at all", "bad_request", "not an .npy file"),
    (b"PK\x03\x04" + bytes(60), "bad_request", "not an .npy file"),  # an .npz (zip)
    (npy_header("|O", (1, 2, 1)) + bytes(16), "bad_dtype", "float32, float64 or int16"),
    (npy(np.zeros((1, 2, 1), np.int32)), "bad_dtype", "int32"),
    (npy_header("<f4", (1, 2, 1))[:20], "bad_request", "header"),
])
def test_malformed_npy_bodies_get_a_clear_error(body, code, words):
    with pytest.raises(ServeError, match=words) as caught:
        parse_npy(body, {}, 1)
    assert caught.value.code == code


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<i2", ">i2"])
def test_npy_bodies_in_either_order_and_byte_order(dtype):
    data = (np.arange(12).reshape(2, 3, 2) * 100).astype(dtype)
    for array in (data, np.asfortranarray(data)):
        read = read_npy(npy(array))
        assert read.dtype.isnative and np.array_equal(read, data)


def test_a_schema_error_answer_is_strict_json_without_the_clients_values(tmp_path):
    torch.manual_seed(0)
    net = S4Network(ModelConfig(name="m", d_input=1, d_output=1, d_model=4, d_state=4,
                                n_layers=1))
    backend = load_backend("torch", save_model(net, tmp_path / "m"), "cpu",
                           step_compiler="torchscript")
    answer = run_job({"m": backend}, Limits(1000),
                     Job("m", b'{"inputs": [[1]], "zz": NaN, "big": "' + b"x" * 5000 + b'"}',
                         "application/json"))
    assert answer.status == 422
    body = json.loads(answer.body, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    assert len(answer.body) < 1000 and body["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("shape", [(-1, -1), (0, 1, 2**63), (1, 0, 2**70), (1, 2**40, 1)])
def test_impossible_npy_shapes_are_a_clear_error(shape):
    body = npy_header("<f4", shape) + bytes(4)
    assert code_of(lambda: read_npy(body)) == "bad_request"


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<f2"])
def test_an_npy_answer_is_the_file_np_save_writes(dtype):
    """npy_bytes writes the header and the data itself: the same bytes as np.save of the
    array as little-endian float32, for any input order and byte order."""
    array = np.arange(2 * 5 * 3, dtype=dtype).reshape(2, 5, 3)[:, ::2] / 7
    expected = io.BytesIO()
    np.save(expected, array.astype("<f4"), allow_pickle=False)
    answer = npy_bytes(array)
    assert bytes(answer) == expected.getvalue()
    np.testing.assert_array_equal(np.load(io.BytesIO(answer)), array.astype("<f4"))


@pytest.mark.parametrize("task", ["sequence", "classification"])
@pytest.mark.parametrize("outputs", ["all", "last"])
def test_sequences_over_the_memory_bound_run_along_time_with_the_same_outputs(tmp_path, task,
                                                                              outputs):
    """A request whose conv view would need more than memory_bytes runs in time blocks through
    the chunked recurrence, each from the state the one before left: the conv view's outputs."""
    torch.manual_seed(1)
    net = S4Network(ModelConfig(name="m", task=task, d_input=1, d_output=2, d_model=8,
                                d_state=8, n_layers=2))
    backend = load_backend("torch", save_model(net, tmp_path / "m"), "cpu",
                           step_compiler="torchscript")
    u = np.random.default_rng(2).standard_normal((2, 5000, 1)).astype(np.float32)
    job = Job("m", npy(u), "application/x-npy", {"outputs": outputs}, True)
    whole = run_job({"m": backend}, Limits(10**7), job)
    small = Limits(10**7, memory_bytes=backend.conv_bytes(5000) // 3)  # blocks of 1024, the least
    calls = []
    chunk = backend.predict

    def counted(*args, **kwargs):
        calls.append(kwargs.get("state") is not None)
        return chunk(*args, **kwargs)

    backend.predict = counted
    along = run_job({"m": backend}, small, job)
    assert whole.status == along.status == 200
    assert calls == [False, True, True, True, True]  # 5000 samples in blocks of 1024
    want, got = np.load(io.BytesIO(whole.body)), np.load(io.BytesIO(along.body))
    assert got.shape == want.shape == (2, 1 if outputs == "last" else 5000, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)
