"""Record files written through memory maps: what a plain read sees, growth, eviction, a file
system without fallocate, and a process SIGKILLed right after a write."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal

import pytest

from server.mapped_files import MappedFiles


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_write_is_what_a_read_sees_and_the_tail_stays(tmp_path):
    files, path = MappedFiles(), str(tmp_path / "a.rec")
    files.write(path, [b"head", memoryview(b"state" * 1000), b""])
    first = read(path)
    assert first.startswith(b"head" + b"state" * 1000)
    files.write(path, [b"HEAD", b"xy"])  # shorter: only the start is overwritten
    assert read(path) == b"HEADxy" + first[6:]
    files.write(path, [b"z" * 100_000])  # longer than the mapping: mapped again, larger
    assert read(path)[:100_000] == b"z" * 100_000
    assert len(files) == 1


def test_dropped_and_evicted_mappings_are_closed(tmp_path):
    files = MappedFiles(limit=2)
    paths = [str(tmp_path / f"{i}.rec") for i in range(3)]
    for path in paths:
        files.write(path, [b"data"])
    assert len(files) == 2  # the least recently used was closed
    files.write(paths[0], [b"again"])  # and maps again on its next write
    assert read(paths[0]).startswith(b"again")
    files.drop(paths[0])
    os.unlink(paths[0])
    files.write(paths[0], [b"new"])  # a new file, not the unlinked inode
    assert read(paths[0]).startswith(b"new")


def test_without_fallocate_the_file_gets_real_zeros(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    files, path = MappedFiles(), str(tmp_path / "a.rec")
    files.write(path, [b"x" * 5000])
    raw = read(path)
    assert raw[:5000] == b"x" * 5000 and len(raw) >= 5000
    assert os.stat(path).st_blocks * 512 >= len(raw)  # allocated, not a sparse hole


def test_a_full_disk_is_an_error_not_a_crash(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "no space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError):
        MappedFiles().write(str(tmp_path / "a.rec"), [b"x" * 5000])


def _write_and_die(path: str) -> None:
    MappedFiles().write(path, [b"kept " * 2000])
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_write_survives_a_sigkill_right_after_it(tmp_path):
    path = str(tmp_path / "a.rec")
    proc = multiprocessing.get_context("spawn").Process(target=_write_and_die, args=(path,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert read(path)[:10_000] == b"kept " * 2000
