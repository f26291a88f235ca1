"""Record files used again instead of created: only files nobody can write any more (an ended
session's, an expired detached one's) become spares, blanked first; a new record file is a
spare renamed into place, and two stores sharing the directory never take the same one."""

from __future__ import annotations

import os

from server.spare_files import SpareFiles
from server.store import LocalDirectoryStore, SessionRecord


def record(samples: int, live: bool = True) -> SessionRecord:
    return SessionRecord("id", "seq", "float32", None, "every", samples, b"state" * 100,
                         live=live)


def records(directory) -> set[str]:
    return {p.name for p in directory.glob("*.rec")}


def test_an_ended_sessions_files_serve_the_next_session(tmp_path):
    store = LocalDirectoryStore(tmp_path)
    for samples in (1, 2):  # both turns' files
        assert store.put_many([("ended", record(samples), 0)], ttl=10)
    inodes = {os.stat(tmp_path / name).st_ino for name in records(tmp_path)}
    store.forget("ended", 0)
    assert records(tmp_path) == set() and len(os.listdir(tmp_path / ".spare")) == 2
    for name in os.listdir(tmp_path / ".spare"):  # blanked: not a record any more
        assert (tmp_path / ".spare" / name).read_bytes()[:4] == bytes(4)
    for samples in (3, 4):
        assert store.put_many([("next", record(samples), 0)], ttl=10)
    assert {os.stat(tmp_path / name).st_ino for name in records(tmp_path)} == inodes
    assert os.listdir(tmp_path / ".spare") == []
    assert store.take("next").samples == 4  # the newer record, whole
    assert store.take("ended") is None


def test_purge_reuses_detached_records_and_removes_live_ones(tmp_path):
    now = [0.0]
    store = LocalDirectoryStore(tmp_path, clock=lambda: now[0])
    assert store.put("detached", record(5, live=False), ttl=10)
    assert store.put_many([("crashed", record(6), 0)], ttl=10)  # its owner stopped writing
    now[0] = 20.0
    assert store.purge_expired() == 2
    assert records(tmp_path) == set()
    # a live record's writer may be a stalled process with the file still mapped: removed
    assert len(os.listdir(tmp_path / ".spare")) == 1


def test_two_processes_never_adopt_the_same_spare(tmp_path):
    a, b = SpareFiles(tmp_path, blank=64), SpareFiles(tmp_path, blank=64)
    for i in range(3):
        (tmp_path / f"old{i}.rec").write_bytes(b"x" * 100)
        a.retire(str(tmp_path / f"old{i}.rec"))
    assert len(os.listdir(tmp_path / ".spare")) == 3
    b._known = os.listdir(a.root)  # b listed them too
    got = [b.adopt(str(tmp_path / "b0")), a.adopt(str(tmp_path / "a0")),
           a.adopt(str(tmp_path / "a1")), b.adopt(str(tmp_path / "b1"))]
    assert got.count(True) == 3 and os.listdir(a.root) == []
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert len(files) == 3 and len({p.stat().st_ino for p in files}) == 3
    assert all(p.read_bytes()[:64] == bytes(64) for p in files)


def test_past_keep_retired_files_are_removed(tmp_path):
    spares = SpareFiles(tmp_path, blank=8, keep=1)
    for i in range(2):
        (tmp_path / f"f{i}").write_bytes(b"y" * 10)
        spares.retire(str(tmp_path / f"f{i}"))
    assert len(os.listdir(spares.root)) == 1 and not (tmp_path / "f1").exists()
    spares.retire(str(tmp_path / "missing"))  # gone already: nothing to do


