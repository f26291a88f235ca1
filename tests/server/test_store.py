"""The local directory store shared by several processes (the workers of one server): a take
in one fences the writes of another at once, although writes read an epoch only when some
take has moved one since."""

from __future__ import annotations

import multiprocessing
import os

from server.local_store import LocalDirectoryStore
from server.store import SessionRecord, pack_record, unpack_record


def record(samples: int) -> SessionRecord:
    return SessionRecord("id", "seq", "float32", None, "every", samples, b"state" * 100)


def test_writes_read_epochs_only_after_a_take(tmp_path, monkeypatch):
    owner, other = LocalDirectoryStore(tmp_path), LocalDirectoryStore(tmp_path)
    reads = []
    real_epoch = owner._epoch
    monkeypatch.setattr(owner, "_epoch", lambda digest: reads.append(digest) or real_epoch(digest))
    items = [(f"tok{i}", record(i), 0) for i in range(20)]
    assert owner.put_many(items, ttl=30) == [True] * 20
    assert len(reads) == 20  # each session checked once
    reads.clear()
    assert owner.put_many(items, ttl=30) == [True] * 20
    assert reads == []  # no take since: nothing to read
    assert other.take("tok3").samples == 3  # another process takes one session over
    moved = [(token, record(100 + i), 0) for i, (token, _, _) in enumerate(items)]
    assert owner.put_many(moved, ttl=30) == [token != "tok3" for token, _, _ in items]
    assert len(reads) == 20  # a take happened: every write is checked again
    assert other.take("tok5").samples == 105  # the writes that went through count
    assert other.take("tok3") is None  # the fenced write was never read


def _take_in_a_process(directory: str, token: str, out) -> None:
    got = LocalDirectoryStore(directory).take(token)
    out.put(None if got is None else (got.samples, got.epoch))


def test_a_take_in_another_process_fences_a_writer_on_the_fast_path(tmp_path):
    owner = LocalDirectoryStore(tmp_path)
    for samples in (1, 2, 3):  # the writer has checked its session and stays on the fast path
        assert owner.put("tok", record(samples), ttl=30)
    out = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(
        target=_take_in_a_process, args=(str(tmp_path), "tok", out))
    proc.start()
    proc.join(30)
    assert out.get(timeout=5) == (3, 1)
    assert not owner.put("tok", record(4), ttl=30)  # fenced, although no epoch was read since
    assert owner.put("tok", record(5), ttl=30, epoch=1)  # the new owner's epoch is fine


def test_records_round_trip_with_their_crc(tmp_path):
    raw = pack_record(record(7), expires_at=12.5, seq=9)
    got, expires_at, seq = unpack_record(raw)
    assert (got.samples, expires_at, seq) == (7, 12.5, 9)
    torn = bytearray(raw)
    torn[40] ^= 1
    try:
        unpack_record(bytes(torn))
    except ValueError:
        pass
    else:
        raise AssertionError("a flipped bit passed the CRC")


def test_purge_keeps_a_live_session_whose_older_file_expired(tmp_path):
    """Written in turn, a quiet session's older file expires before its newer one: the purge
    waits until both have (the owner's mapping would go on writing a deleted file)."""
    now = [0.0]
    store = LocalDirectoryStore(tmp_path, clock=lambda: now[0])
    assert store.put_many([("quiet", record(1), 0)], ttl=10)  # file 0, until t=10
    now[0] = 8.0
    assert store.put_many([("quiet", record(2), 0)], ttl=10)  # file 1, until t=18
    now[0] = 12.0
    assert store.purge_expired() == 0
    assert store.put_many([("quiet", record(3), 0)], ttl=10)  # file 0 again, until t=22
    now[0] = 30.0
    assert store.purge_expired() == 1
    assert store.take("quiet") is None
    now[0] = 40.0
    assert store.put_many([("back", record(4), 0)], ttl=10)
    assert store.take("back").samples == 4


def test_an_epoch_purged_away_fences_its_owner(tmp_path):
    now = [0.0]
    owner = LocalDirectoryStore(tmp_path, clock=lambda: now[0])
    assert owner.put("tok", record(1), ttl=10)
    assert owner.take("tok").epoch == 1  # taken: the owner now writes at epoch 1
    for samples in (2, 3):  # checked once, then on the fast path
        assert owner.put_many([("tok", record(samples), 1)], ttl=10) == [True]
    now[0] = 100.0
    assert owner.purge_expired() == 1  # its records expired (the owner stopped writing)
    epoch_file = next(tmp_path.glob("*.epoch"))
    os.utime(epoch_file, (0, 0))  # and its epoch is old
    owner.purge_expired()
    assert not epoch_file.exists()
    assert owner.put_many([("tok", record(4), 1)], ttl=10) == [False]  # epoch 1 is gone
