"""Slab files (server/slabs.py) under the local store: records in pairs of halves, a checkpoint
slice copied in by rows, a record that outgrows its halves, files of dead processes, a full
disk, and a process SIGKILLed right after a write."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal

import numpy as np
import pytest

from server.local_store import LocalDirectoryStore
from server.slabs import BODY_AT, PAIRS, crc, half_for, parse
from server.store import RowBatch, SessionRecord, pack_record


def record(samples: int, ring: bytes = b"", state: bytes = b"state" * 100) -> SessionRecord:
    return SessionRecord("id", "seq", "float32", None, "every", samples, state, live=True,
                         replies=3, ring=ring)


def batch(count: int, rng, order=None) -> tuple[RowBatch, list[bytes]]:
    """`count` records whose blobs are a head, two row parts and a tail; and the blobs."""
    a = rng.integers(0, 256, (count, 40), dtype=np.uint8)
    b = rng.integers(0, 256, (count, 24), dtype=np.uint8)
    order = list(range(count)) if order is None else order
    items = [(f"tok{i}", record(i, ring=b"r" * i), 0) for i in order]
    heads = [b"head%d" % i for i in order]
    tails = [b"tag" * (i % 2) for i in order]
    blobs = [heads[k] + a[k].tobytes() + b[k].tobytes() + tails[k] for k in range(count)]
    return RowBatch(items, heads, [a, b], tails), blobs


def test_a_checkpoint_slice_reads_back_as_the_records_it_carries(tmp_path):
    store, rng = LocalDirectoryStore(tmp_path), np.random.default_rng(0)
    count = 2 * PAIRS + 5  # more sessions than two slab files hold
    for _ in range(3):  # both halves written, then the first again
        rows, blobs = batch(count, rng)
        assert store.put_rows(rows, ttl=30) == [True] * count
    sizes = [len(slab.halves) // 2 for slab in store._slabs.own.values()]
    assert sizes == [PAIRS] * 3  # files made as sessions came, none reused twice
    for i, blob in enumerate(blobs):
        got = store.take(f"tok{i}")
        assert (got.state, got.samples, got.ring, got.replies, got.live) == (
            blob, i, b"r" * i, 3, True)
    assert store.records() == []


def test_rows_in_any_order_land_in_their_own_halves(tmp_path):
    store, rng = LocalDirectoryStore(tmp_path), np.random.default_rng(1)
    rows, _ = batch(10, rng)
    store.put_rows(rows, ttl=30)
    order = [3, 9, 0, 4, 1, 8, 2, 7, 5, 6]  # pairs no longer in row order: an indexed copy
    rows, blobs = batch(10, rng, order)
    store.put_rows(rows, ttl=30)
    for k, i in enumerate(order):
        assert store.take(f"tok{i}").state == blobs[k]


def test_a_record_that_outgrows_its_halves_moves_and_leaves_nothing_behind(tmp_path):
    store = LocalDirectoryStore(tmp_path)
    assert store.put("t", record(1), ttl=30)
    big = b"x" * (3 * half_for(len(pack_record(record(1)))))
    assert store.put("t", record(2, state=big), ttl=30)  # a larger pair in a larger slab
    assert len({slab.half for slab in store._slabs.own.values()}) == 2
    assert len(store.records()) == 1  # the old pair was cleared
    got = store.take("t")
    assert (got.samples, got.state) == (2, big)


def test_a_write_cut_short_leaves_the_other_half(tmp_path):
    store, rng = LocalDirectoryStore(tmp_path), np.random.default_rng(2)
    rows, first = batch(4, rng)
    store.put_rows(rows, ttl=30)
    rows, _ = batch(4, rng)
    store.put_rows(rows, ttl=30)
    # the second write of tok2 was cut mid-copy: its tensor bytes landed, its seal did not
    slab = next(iter(store._slabs.own.values()))
    slab.halves[2 * 2 + 1, BODY_AT] ^= 0xFF
    assert store.take("tok2").state == first[2]


def test_crc_in_pieces_is_the_crc_of_the_whole():
    import zlib

    data = os.urandom(20_000)
    assert crc(data) == zlib.crc32(data)
    assert crc(data[5000:], crc(data[:5000])) == zlib.crc32(data)


def _write_and_die(directory: str) -> None:
    store = LocalDirectoryStore(directory)
    store.put("kept", record(7), ttl=30)
    os.kill(os.getpid(), signal.SIGKILL)


def _killed_writer(directory) -> None:
    proc = multiprocessing.get_context("spawn").Process(target=_write_and_die,
                                                        args=(str(directory),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def test_a_write_survives_a_sigkill_right_after_it(tmp_path):
    _killed_writer(tmp_path)
    got = LocalDirectoryStore(tmp_path).take("kept")
    assert got is not None and got.samples == 7


def test_slab_files_of_a_dead_process_go_once_nothing_in_them_can_be_taken(tmp_path):
    _killed_writer(tmp_path)
    now = [0.0]
    store = LocalDirectoryStore(tmp_path, clock=lambda: now[0] + 1e10)  # far in the future
    assert store.purge_expired() == 1  # expired: the dead process's file goes
    assert not list(tmp_path.glob("*.slab"))
    _killed_writer(tmp_path)
    fresh = LocalDirectoryStore(tmp_path)
    assert fresh.purge_expired() == 0 and list(tmp_path.glob("*.slab"))  # still takeable
    assert fresh.take("kept").samples == 7
    fresh.purge_expired()  # nothing expired, but nothing left to take: the file goes
    assert not list(tmp_path.glob("*.slab"))


def test_a_live_process_keeps_its_files_whatever_they_hold(tmp_path):
    owner = LocalDirectoryStore(tmp_path)
    owner.put("t", record(1), ttl=30)
    assert owner.take("t") is not None  # its only record taken: the file holds nothing
    assert LocalDirectoryStore(tmp_path).purge_expired() == 0
    assert list(tmp_path.glob("*.slab"))  # but its owner lives and may write there again
    assert owner.put("u", record(2), ttl=30)
    assert LocalDirectoryStore(tmp_path).take("u").samples == 2


def test_without_fallocate_a_slab_gets_real_zeros(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    store = LocalDirectoryStore(tmp_path)
    assert store.put("t", record(1), ttl=30)
    path = next(tmp_path.glob("*.slab"))
    assert os.stat(path).st_blocks * 512 >= os.stat(path).st_size  # no sparse hole
    assert store.take("t").samples == 1


def test_a_full_disk_is_an_error_not_a_crash(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "no space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError):
        LocalDirectoryStore(tmp_path).put("t", record(1), ttl=30)
    assert not list(tmp_path.glob("*.slab")) and not list(tmp_path.glob(".*.tmp"))


def test_a_half_that_does_not_check_is_no_record():
    assert parse(b"") is None and parse(b"S4SL" + bytes(200)) is None


def _keep_writing(directory: str, sessions: int, seconds: float) -> None:
    import time

    store, k, end = LocalDirectoryStore(directory), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        k += 1
        items = [(f"tok{i}", record(k), 0) for i in range(sessions)]
        part = np.full((sessions, 65536), k % 256, np.uint8)
        store.put_rows(RowBatch(items, [b"head"] * sessions, [part], [b""] * sessions), 30)


def test_takes_racing_a_writer_in_another_process_get_whole_records(tmp_path):
    """A checkpointing process rewrites 40 sessions of 64 KB as fast as it can while this one
    takes them over: every record taken is one whole write of that session (its state bytes
    all say the write its options came from), never a mix of two. (A half read while it is
    overwritten is seldom the newer one: the CRC's own check is the cut-short test above.)"""
    import time

    writer = multiprocessing.get_context("spawn").Process(
        target=_keep_writing, args=(str(tmp_path), 40, 4.0))
    writer.start()
    try:
        store, deadline = LocalDirectoryStore(tmp_path), time.monotonic() + 30
        while not store.records() and time.monotonic() < deadline:
            time.sleep(0.05)
        taken = 0
        for i in range(40):
            got = store.take(f"tok{i}")
            if got is None:
                continue
            assert got.state == b"head" + bytes([got.samples % 256]) * 65536
            taken += 1
            time.sleep(0.01)
        assert taken >= 36  # the ones never written yet when taken are the only misses
    finally:
        writer.join(30)
