"""RFC 6455 frame headers as client/wire.py writes and reads them (the server's push transport
and the lean load generator both frame messages with these)."""

import pytest

from client.wire import ws_header, ws_length


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 1 << 33])
@pytest.mark.parametrize("mask", [False, True])
def test_header_length_round_trip(size, mask):
    head = ws_header(2, size, mask)
    assert head[0] == 0x82 and bool(head[1] & 0x80) == mask
    assert ws_length(b"xx" + head, 2) == (size, 2 + len(head))
    for cut in range(len(head)):  # an incomplete header is not read
        assert ws_length(head[:cut], 0) is None
