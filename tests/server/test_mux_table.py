"""A mux connection's handle table: routes are worked out once per list of ids and never
outlive a change of the table."""

from types import SimpleNamespace

import numpy as np

from server.mux_table import HandleTable


def handle(sid: int, rate: float = 1.0, dtype: str = "float32") -> SimpleNamespace:
    stream = SimpleNamespace(rate=rate, name=f"stream {sid}")
    return SimpleNamespace(sid=sid, session=SimpleNamespace(dtype=dtype, stream=stream))


def ids(*sids: int) -> np.ndarray:
    return np.array(sids, np.uint32)


def test_a_route_is_kept_until_the_table_changes():
    table = HandleTable()
    a, b = handle(1), handle(2)
    table.add(a)
    table.add(b)
    streams, rate = table.route(ids(2, 1))
    assert streams == [b.session.stream, a.session.stream] and rate == 1.0
    b.session = None  # a change the table is not told of: the kept route still answers
    assert table.route(ids(2, 1))[0][0] is streams[0]
    table.pop(2)  # told: worked out again, and session 2 is gone
    assert table.route(ids(2, 1)) is None
    table.add(handle(2))
    assert table.route(ids(2, 1))[0][0] is not streams[0]
    table.clear()
    assert table.route(ids(1)) is None and len(table) == 0


def test_no_route_for_unknown_repeated_other_dtype_or_mixed_rate_sessions():
    table = HandleTable()
    for h in (handle(1), handle(2, rate=2.0), handle(3, dtype="int16"), handle(4)):
        table.add(h)
    assert table.route(ids(1, 4)) is not None
    assert table.route(ids(1, 9)) is None  # unknown
    assert table.route(ids(1, 1)) is None  # one session twice
    assert table.route(ids(1, 3)) is None  # int16 samples
    assert table.route(ids(1, 2)) is None  # two rates
