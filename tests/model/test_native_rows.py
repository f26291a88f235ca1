"""model/native_rows.py: a rows call prepared once steps inputs read from a received
message, into strided records, only for the records (keys) it was prepared for."""

import array
import math

import numpy as np
import pytest
import torch

from tests.model.test_native_step import _pool_and_twin


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


def test_rows_step_from_and_into_strided_records(cache):
    """at_rows_into reads inputs from, and writes outputs into, records of a larger dtype
    (a wire message and its reply): the same numbers as from contiguous arrays; a row with a
    NaN input is neither advanced nor counted."""
    net, rec, step, pool32, pool64, twin32, twin64 = _pool_and_twin(cache)
    d_in, d_out = net.config.d_input, net.config.d_output
    rows = np.array([7, 2, 5, 0])
    u = torch.randn(4, d_in)
    u[3, 0] = math.nan
    message = np.zeros(4, [("sid", "<u4"), ("T", "<u4"), ("x", "<f4", (1, d_in))])
    message["x"][:, 0] = u.numpy()
    reply = np.zeros(4, [("sid", "<u4"), ("status", "<u2"), ("res", "<u2"), ("rows", "<u4"),
                         ("y", "<f4", (1, d_out))])
    reply["sid"] = [11, 12, 13, 14]
    kept = np.full(4, 7, np.uint8)
    done = step.at_rows_into(rec, message["x"][:, 0], pool32, pool64, rows, reply["y"][:, 0],
                             kept)
    expected = np.empty((3, d_out), np.float32)
    step.at_rows_into(rec, u[:3].numpy(), twin32, twin64, rows[:3], expected,
                      np.empty(3, np.uint8))
    assert done == 3 and kept.tolist() == [1, 1, 1, 0]
    assert np.array_equal(reply["y"][:3, 0], expected)
    assert reply["sid"].tolist() == [11, 12, 13, 14]  # the records around the outputs stay
    assert torch.equal(pool32, twin32) and torch.equal(pool64, twin64)  # row 0 not advanced
    with pytest.raises(ValueError, match="writable"):
        step.at_rows_into(rec, message["x"][:, 0], pool32, pool64, rows,
                          np.frombuffer(reply.tobytes(), reply.dtype)["y"][:, 0], kept)
    with pytest.raises(ValueError, match="rows must lie"):
        step.at_rows_into(rec, message["x"][:, 0], pool32, pool64, np.array([1, 2, 3, 10]),
                          reply["y"][:, 0], kept)


def test_a_rows_call_steps_inputs_read_from_a_received_message(cache):
    """The prepared call reads each row's inputs out of the message's bytes (header and
    entry records around them) and gives what at_rows_into gives; every call advances the
    rows again; a NaN row is neither advanced nor counted; inputs outside the buffer or off
    whole floats are refused before anything changes."""
    net, rec, step, pool32, pool64, twin32, twin64 = _pool_and_twin(cache)
    d_in, d_out = net.config.d_input, net.config.d_output
    rows = np.array([7, 2, 5, 0])
    entries = np.zeros(4, [("sid", "<u4"), ("T", "<u4"), ("x", "<f4", (1, d_in))])
    reply = np.zeros(4, [("sid", "<u4"), ("status", "<u2"), ("res", "<u2"), ("rows", "<u4"),
                         ("y", "<f4", (1, d_out))])
    kept = np.empty(4, np.uint8)
    call = step.rows_call(rec, pool32, pool64, rows, reply["y"][:, 0], kept)
    header, stride = 12, entries.itemsize
    for t in range(3):
        u = torch.randn(4, d_in)
        if t == 2:
            u[3, 0] = math.nan
        entries["x"][:, 0] = u.numpy()
        message = b"H" * header + entries.tobytes()
        done = call(message, header + 8, stride)
        expected, flags = np.empty((4, d_out), np.float32), np.empty(4, np.uint8)
        assert step.at_rows_into(rec, u.numpy(), twin32, twin64, rows, expected, flags) == done
        assert done == (3 if t == 2 else 4) and kept.tolist() == flags.tolist()
        assert np.array_equal(reply["y"][:done, 0], expected[:done])
        assert torch.equal(pool32, twin32) and torch.equal(pool64, twin64)
    padded = message + bytes(8)  # room, so that these reach the C step's own check
    for offset, stride_ in ((header + 8, stride + 1), (header + 9, stride)):
        with pytest.raises(ValueError, match="whole floats"):
            call(padded, offset, stride_)
    for offset, stride_ in ((header + 12, stride), (-4, stride), (header + 8, 4)):
        with pytest.raises(ValueError, match="do not fit"):
            call(message, offset, stride_)
    assert torch.equal(pool32, twin32) and torch.equal(pool64, twin64)


def test_a_rows_call_with_keys_steps_only_the_records_it_was_prepared_for(cache):
    """With keys, a call checks the 8 bytes before every input (a record's session and sample
    count) first: any that differ leave every row as it was and say so (None); matching
    records step as a call without keys does. With counts, each row advanced (not one whose
    input was NaN, not one of a refused call) counts one more sample."""
    net, rec, step, pool32, pool64, twin32, twin64 = _pool_and_twin(cache)
    d_in, d_out = net.config.d_input, net.config.d_output
    rows = np.array([3, 1, 6])
    entries = np.zeros(3, [("sid", "<u4"), ("T", "<u4"), ("x", "<f4", (1, d_in))])
    entries["sid"], entries["T"] = [11, 12, 13], 1
    entries["x"][:, 0] = torch.randn(3, d_in).numpy()
    keys = np.ascontiguousarray(np.stack([entries["sid"], entries["T"]], axis=1))
    y, kept = np.empty((3, d_out), np.float32), np.empty(3, np.uint8)
    counts = array.array("q", range(pool32.shape[0]))
    call = step.rows_call(rec, pool32, pool64, rows, y, kept, keys, counts)
    header, stride = 12, entries.itemsize
    for field, index, value in (("sid", 2, 14), ("T", 0, 2), ("sid", 0, 12)):
        changed = entries.copy()
        changed[field][index] = value
        assert call(bytes(header) + changed.tobytes(), header + 8, stride) is None
        assert torch.equal(pool32, twin32) and torch.equal(pool64, twin64)
    assert counts.tolist() == list(range(pool32.shape[0]))
    assert call(bytes(header) + entries.tobytes(), header + 8, stride) == 3
    expected, flags = np.empty((3, d_out), np.float32), np.empty(3, np.uint8)
    assert step.at_rows_into(rec, entries["x"][:, 0], twin32, twin64, rows, expected, flags) == 3
    assert np.array_equal(y, expected) and torch.equal(pool32, twin32)
    entries["x"][1, 0, 0] = np.nan  # row 1 stays, uncounted
    assert call(bytes(header) + entries.tobytes(), header + 8, stride) == 2
    want = list(range(pool32.shape[0]))
    want[3], want[6] = want[3] + 2, want[6] + 2
    want[1] += 1
    assert counts.tolist() == want
    with pytest.raises(ValueError, match="counts must be"):
        step.rows_call(rec, pool32, pool64, rows, y, kept, keys, counts[:-1])
    with pytest.raises(ValueError, match="do not fit"):  # a key would lie before the buffer
        call(entries.tobytes(), 4, stride)
    with pytest.raises(ValueError, match="keys must be"):
        step.rows_call(rec, pool32, pool64, rows, y, kept, keys[:2])
