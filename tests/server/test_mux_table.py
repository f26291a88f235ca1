"""A mux connection's handle table: routes are worked out once per list of ids and never
outlive a change of the table or a dropped stream."""

from types import SimpleNamespace

import numpy as np

from server.mux_table import HandleTable


def handle(sid: int, rate: float = 1.0, dtype: str = "float32") -> SimpleNamespace:
    stream = SimpleNamespace(rate=rate, slot=10 * sid, epoch=sid, name=f"stream {sid}")
    owner = SimpleNamespace(sid=sid, session=SimpleNamespace(dtype=dtype, stream=stream))
    stream.sink = owner
    return owner


def ids(*sids: int) -> np.ndarray:
    return np.array(sids, np.uint32)


def test_a_route_is_kept_until_the_table_changes():
    table = HandleTable()
    a, b = handle(1), handle(2)
    table.add(a)
    table.add(b)
    route = table.route(ids(2, 1), drops=0)
    assert route.streams == [b.session.stream, a.session.stream] and route.rate == 1.0
    assert route.rows.tolist() == [20, 10]
    b.session = None  # a change the table is not told of: the kept route still answers
    assert table.route(ids(2, 1), drops=0) is route
    table.pop(2)  # told: worked out again, and session 2 is gone
    assert table.route(ids(2, 1), drops=0) is None
    table.add(handle(2))
    assert table.route(ids(2, 1), drops=0).streams[0] is not route.streams[0]
    table.clear()
    assert table.route(ids(1), drops=0) is None and len(table) == 0


def test_a_route_is_worked_out_again_once_a_stream_was_dropped():
    table = HandleTable()
    a = handle(1)
    table.add(a)
    route = table.route(ids(1), drops=0)
    a.session.stream.epoch, a.session.stream.slot = 7, 3  # dropped and placed again
    assert table.route(ids(1), drops=0) is route  # the count did not move: kept
    again = table.route(ids(1), drops=1)
    assert again is not route and again.rows.tolist() == [3]
    a.session.stream.sink = None  # dropped, no longer owned here: no route
    assert table.route(ids(1), drops=2) is None


def test_no_route_for_unknown_repeated_other_dtype_or_mixed_rate_sessions():
    table = HandleTable()
    for h in (handle(1), handle(2, rate=2.0), handle(3, dtype="int16"), handle(4)):
        table.add(h)
    assert table.route(ids(1, 4), drops=0) is not None
    assert table.route(ids(1, 9), drops=0) is None  # unknown
    assert table.route(ids(1, 1), drops=0) is None  # one session twice
    assert table.route(ids(1, 3), drops=0) is None  # int16 samples
    assert table.route(ids(1, 2), drops=0) is None  # two rates
