"""The local store when another process acts in the middle of a take, when a checkpoint slice
fails half-way, and when the directory holds files that are not ours or more files than the
maps we keep. Two stores on one directory stand for two processes (flock is per open file, so
each sees the other's slab files as alive); a hook runs the other side's events at the exact
point of the take in question."""

from __future__ import annotations

import contextlib
import errno
import os
import threading

import numpy as np
import pytest

from server import slabs
from server.local_store import LocalDirectoryStore
from server.store import RowBatch, SessionRecord


def record(samples: int, ring: bytes = b"", state: bytes = b"S" * 500) -> SessionRecord:
    return SessionRecord("id", "seq", "float32", None, "every", samples, state, live=True,
                         replies=0, ring=ring)


def before_the_epoch_moves(store: LocalDirectoryStore, event) -> None:
    """`event()` once, after the take has seen there is a record and before it moves the
    epoch on."""
    moving = store._moving_epoch

    @contextlib.contextmanager
    def hooked():
        store._moving_epoch = moving
        event()
        with moving():
            yield

    store._moving_epoch = hooked


def after_the_epoch_moved(store: LocalDirectoryStore, event) -> None:
    moving = store._moving_epoch

    @contextlib.contextmanager
    def hooked():
        store._moving_epoch = moving
        with moving():
            yield
        event()

    store._moving_epoch = hooked


def test_a_write_acknowledged_just_before_the_epoch_moves_is_the_one_taken(tmp_path):
    owner, taker = LocalDirectoryStore(tmp_path), LocalDirectoryStore(tmp_path)
    assert owner.put("tok", record(100), ttl=60)
    acked = []
    before_the_epoch_moves(taker, lambda: acked.append(owner.put("tok", record(200), ttl=60)))
    assert taker.take("tok").samples == 200 and acked == [True]


def test_a_record_that_moved_to_a_larger_pair_meanwhile_is_found_there(tmp_path):
    owner, taker = LocalDirectoryStore(tmp_path), LocalDirectoryStore(tmp_path)
    assert owner.put("tok", record(100), ttl=60)
    grown = record(200, ring=b"r" * 20_000)  # the reply ring filled: the record moves

    def write() -> None:
        assert owner.put("tok", grown, ttl=60)

    before_the_epoch_moves(taker, write)
    got = taker.take("tok")
    assert (got.samples, got.ring) == (200, grown.ring)


def test_a_write_after_the_epoch_moved_is_refused(tmp_path):
    """Its writer is told it does not count (and lets its pairs go only once the take is
    done); landed before the take looked, it is read, being the newest."""
    owner, taker = LocalDirectoryStore(tmp_path), LocalDirectoryStore(tmp_path)
    assert owner.put("tok", record(100), ttl=60)
    told, fencing = [], threading.Event()
    fence = owner._fence

    def fenced(names) -> None:  # waits for the directory's lock, which the take holds
        fencing.set()
        fence(names)

    owner._fence = fenced
    writer = threading.Thread(target=lambda: told.append(owner.put("tok", record(200), ttl=60)))
    after_the_epoch_moved(taker, lambda: (writer.start(), fencing.wait(10)))
    got = taker.take("tok")
    writer.join(10)
    assert told == [False] and got.samples == 200
    assert owner._pairs == {} and taker.take("tok") is None


def test_a_take_never_returns_or_clears_another_sessions_record(tmp_path):
    """Were the pair freed and given to another session between the take's look and its read
    (our processes free pairs only under the directory's lock, which the take holds; this
    reuses one behind its back), the take reads nothing of it and leaves it whole."""
    owner, taker = LocalDirectoryStore(tmp_path), LocalDirectoryStore(tmp_path)
    assert owner.put("tokD", record(100), ttl=60)

    def reuse() -> None:
        owner._let_go(next(iter(owner._pairs)))  # D's pair, freed without the lock
        assert owner.put("tokE", record(7, state=b"E" * 500), ttl=60)
        assert owner.put("tokE", record(8, state=b"E" * 500), ttl=60)  # both halves E's

    after_the_epoch_moved(taker, reuse)
    assert taker.take("tokD") is None
    assert taker.take("tokE").samples == 8


def test_a_slice_that_fails_half_way_leaves_every_record_as_it_was(tmp_path, monkeypatch):
    store = LocalDirectoryStore(tmp_path)
    assert store.put("tokD", record(1), ttl=60) and store.put("tokF", record(1), ttl=60)
    state = np.zeros((2, 600), np.uint8)
    grown = [("tokD", record(2, ring=b"r" * 20_000), 0),  # a larger pair, in a new file
             ("tokF", record(2, ring=b"r" * 60_000), 0)]  # a larger one still: the disk is full
    reserve, calls = os.posix_fallocate, []

    def second_is_full(fd, offset, length):
        calls.append(length)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "no space left on device")
        reserve(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", second_is_full)
    with pytest.raises(OSError):
        store.put_rows(RowBatch(grown, [b"", b""], [state], [b"", b""]), ttl=60)
    monkeypatch.undo()
    assert store.take("tokF").samples == 1  # untouched
    store.forget("tokD", 0)  # an end after the failure leaves nothing of it to take
    assert store.take("tokD") is None
    assert store.put("tokG", record(5), ttl=60) and store.put("tokG", record(6), ttl=60)
    assert store.take("tokG").samples == 6 and store.records() == []


@pytest.mark.parametrize("name", ["junk-0.slab", "junk-8.slab", "x.slab", "junk-4096.slab"])
def test_a_stray_slab_file_does_not_stop_takes_or_purges(tmp_path, name):
    store = LocalDirectoryStore(tmp_path)
    assert store.put("tok", record(1), ttl=60)
    (tmp_path / name).write_bytes(b"not a slab file" * 10)
    assert store.records() == [(store.records()[0][0], 0)]
    store.purge_expired()
    assert store.take("tok").samples == 1


def test_more_foreign_files_than_the_maps_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(slabs, "PAIRS", 1)  # a file per session
    others = [LocalDirectoryStore(tmp_path) for _ in range(6)]
    for i, other in enumerate(others):
        assert other.put(f"tok{i}", record(i), ttl=60)
    taker = LocalDirectoryStore(tmp_path)
    taker._slabs._seen = type(taker._slabs._seen)(maxsize=2)  # fewer than the files
    assert len(taker.records()) == 6
    for i in reversed(range(6)):
        assert taker.take(f"tok{i}").samples == i
