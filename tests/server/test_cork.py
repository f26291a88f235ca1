"""server/cork.py: replies written during a round leave as one write per connection at its end,
in order; outside a round they leave at once; a connection closed meanwhile sends none of them
after its close frame; reading resumes at the round's end, unless paused again meanwhile."""

from collections import deque
from types import SimpleNamespace

from websockets.protocol import State

from client.wire import ws_header
from server.cork import CORK
from server.transport import PushProtocol


def _peer() -> tuple[PushProtocol, list[bytes]]:
    peer = PushProtocol.__new__(PushProtocol)  # only what writing touches
    writes: list[bytes] = []
    peer.transport = SimpleNamespace(write=writes.append)
    peer.conn = SimpleNamespace(extensions=[], state=State.OPEN)
    peer.close_sent = peer.disconnected = False
    return peer, writes


def test_a_rounds_replies_leave_as_one_write_per_connection():
    (a, a_writes), (b, b_writes) = _peer(), _peer()
    with CORK:
        a.send_bytes(b"one")
        b.send_text("x")
        a.send_text("two")
        a.send_bytes(b"3")
        assert a_writes == b_writes == []
    assert a_writes == [ws_header(2, 3) + b"one" + ws_header(1, 3) + b"two" + ws_header(2, 1)
                        + b"3"]
    assert b_writes == [ws_header(1, 1) + b"x"]
    a.send_bytes(b"now")  # no tick: at once
    assert a_writes[-1] == ws_header(2, 3) + b"now"


def test_held_replies_are_dropped_once_the_connection_closed():
    peer, writes = _peer()
    with CORK:
        peer.send_bytes(b"late")
        peer.close_sent = True  # e.g. uvicorn answered the client's close meanwhile
    assert writes == []


def _reader() -> tuple[PushProtocol, list[str]]:
    peer, _ = _peer()
    calls: list[str] = []
    peer.transport.pause_reading = lambda: calls.append("pause")
    peer.transport.resume_reading = lambda: calls.append("resume")
    peer._backlog, peer.handler, peer.read_paused = deque(), None, False
    peer.pause_reading()
    calls.clear()
    return peer, calls


def test_reading_resumes_at_the_end_of_the_round_not_within_it():
    """A message read mid-round could end or take over a session the round has stepped but
    not answered yet: a resume asked for within a round happens at its end."""
    peer, calls = _reader()
    with CORK:
        peer.resume_reading()
        peer.resume_reading()  # asked twice, resumed once
        assert calls == []
    assert calls == ["resume"]
    peer.pause_reading()
    peer.resume_reading()  # outside a round: at once
    assert calls == ["resume", "pause", "resume"]


def test_a_pause_after_a_resume_in_the_same_round_keeps_reading_paused():
    peer, calls = _reader()
    with CORK:
        peer.resume_reading()
        peer.pause_reading()
    assert calls == [] and peer.read_paused
