"""The lean load engine's frame handling, unit by unit (the end-to-end runs are in
test_stream_echo.py, on both engines)."""

from __future__ import annotations

import numpy as np

from loadtest.raw_session import RawSession, _client_frame
from loadtest.session import SessionPlan


class _Sock:
    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    def send(self, opcode: int, payload: bytes) -> None:
        self.sent.append((opcode, payload))


def _session() -> RawSession:
    plan = SessionPlan(index=0, start_at=0.0, stop_at=1.0, period_s=0.01, frame=1,
                       wire="float32", seen=np.zeros((8, 2), np.float32), verify=False,
                       verify_max_samples=8, max_in_flight=8)
    session = RawSession(plan, d_output=3)
    session.sock = _Sock()
    return session


def test_a_server_ping_is_answered_with_its_pong():
    session = _session()
    session.on_frame(9, b"keepalive")
    assert session.sock.sent == [(10, b"keepalive")]
    assert not session.rec.errors


def test_replies_are_matched_to_frames_in_order():
    session = _session()
    session.pending.extend([(0.0, 0), (0.0, 1)])
    session.on_frame(2, np.zeros(3, "<f4").tobytes())
    session.on_frame(2, np.zeros(2, "<f4").tobytes())  # a torn reply
    session.on_frame(2, np.zeros(3, "<f4").tobytes())  # nothing waits for it
    assert (session.rec.replies_ok, session.rec.wrong, session.rec.duplicated) == (1, 1, 1)


def test_client_frames_are_masked_and_unmask_to_the_payload():
    payload = bytes(range(200))
    raw = _client_frame(2, payload)
    assert raw[0] == 0x82 and raw[1] == 0x80 | 126
    key, body = raw[4:8], raw[8:]
    assert bytes(b ^ key[i % 4] for i, b in enumerate(body)) == payload
