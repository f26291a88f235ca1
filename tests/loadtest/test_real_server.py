"""The load tester against a real s4serve: values match predict, the server's view is read."""

from __future__ import annotations

from tests.loadtest.conftest import quick_stream


def test_stream_load_on_real_server_matches_predict(server_url: str):
    result = quick_stream(server_url, model="tiny", sessions=6, frame=2, rate=200.0)
    assert result.ok, result.failures
    assert result.counts["replies_ok"] == result.counts["frames_sent"] > 0
    assert result.verify["sessions"] == 2
    assert result.verify["max_abs_err"] <= 1e-4
    server = result.server
    assert server["available"]
    assert server["step_batch_size"]["count"] > 0
    assert server["frames"]["ok"] >= result.counts["replies_ok"]
