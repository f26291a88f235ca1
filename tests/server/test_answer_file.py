"""server/answer_file.py: a large answer reaches the other end of a real pipe through a memory
file, byte for byte; small ones are not put in one."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from server.answer_file import SHARE_BYTES, AnswerFile, receive

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux memfd only")


def test_a_large_answer_is_passed_as_a_memory_file():
    here, there = multiprocessing.Pipe()
    shared = AnswerFile()
    buffer = shared.allocate(3 * SHARE_BYTES + 5)
    buffer[:] = np.arange(buffer.size) % 251
    body = memoryview(buffer)
    assert shared.holds(body)
    shared.send(here, os.getpid())
    assert shared.fd is None  # its descriptor closed once sent
    got = receive(there, body.nbytes)
    assert got.readonly and bytes(got) == bytes(body)


def test_a_small_answer_stays_in_memory():
    shared = AnswerFile()
    buffer = shared.allocate(SHARE_BYTES - 1)
    assert shared.fd is None and not shared.holds(memoryview(buffer))
