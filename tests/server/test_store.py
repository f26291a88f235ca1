"""The local directory store shared by several processes (the workers of one server): a take
in one fences the writes of another at once, although writes read an epoch only when some
take has moved one since."""

from __future__ import annotations

import multiprocessing

from server.store import LocalDirectoryStore, SessionRecord, pack_record, unpack_record


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
