"""The streaming load test against the echo app: clean runs pass, every fault is caught."""

from __future__ import annotations

import pytest

from loadtest.processes import ServerProcess
from tests.loadtest.conftest import quick_stream


@pytest.mark.parametrize(
    ("wire", "frame", "rate", "engine"),
    [("float32", 1, 200.0, "raw"), ("int16", 32, 3200.0, "raw"), ("float32", 1, 200.0, "client"),
     ("int16", 32, 3200.0, "client"), ("json", 4, 400.0, "auto")],
)
def test_clean_run_passes_and_counts_every_frame(echo_url: str, wire: str, frame: int, rate: float,
                                                 engine: str):
    result = quick_stream(echo_url, wire=wire, frame=frame, rate=rate, engine=engine)
    assert result.ok, result.failures
    counts = result.counts
    assert counts["connected"] == 4
    assert counts["frames_sent"] > 4 * 0.6 * rate / frame * 0.5
    assert counts["replies_ok"] == counts["frames_sent"]
    assert result.latency_ms["count"] == counts["replies_ok"]
    assert result.latency_ms["p50"] <= result.latency_ms["p99"] <= result.latency_ms["max"]
    # The echo model is the identity, so streamed values equal predict's exactly.
    assert result.verify["sessions"] == 2
    assert result.verify["max_abs_err"] == 0.0
    assert not result.server["available"]  # the echo app exports no s4serve_ metrics


@pytest.mark.parametrize(
    ("fault", "wire", "symptom", "engine"),
    [
        ("drop:20", "float32", "lost", "raw"),
        ("duplicate:20", "float32", "duplicated", "raw"),
        ("corrupt:20", "float32", "wrong", "raw"),
        ("drop:20", "float32", "lost", "client"),
        ("duplicate:20", "float32", "duplicated", "client"),
        ("corrupt:20", "float32", "wrong", "client"),
        ("drop:20", "json", "lost", "auto"),
        ("swap:20", "json", "wrong", "auto"),  # a reply naming another frame's seq
    ],
)
def test_faulty_replies_fail_the_run(fault: str, wire: str, symptom: str, engine: str):
    with ServerProcess.echo(fault=fault) as srv:
        result = quick_stream(srv.url, wire=wire, drain_s=1.0, engine=engine)
    assert not result.ok
    assert result.counts[symptom] > 0
    assert any(symptom in f for f in result.failures)


@pytest.mark.parametrize("engine", ["raw", "client"])
def test_error_replies_and_wrong_values_fail_the_run(engine: str):
    with ServerProcess.echo(fault="error:20") as srv:
        errors = quick_stream(srv.url, engine=engine)
    with ServerProcess.echo(fault="swap:3") as srv:
        swapped = quick_stream(srv.url, engine=engine)
    assert not errors.ok and errors.errors.get("injected", 0) > 0
    # A binary reply with wrong values has the right size: only the predict check sees it.
    assert not swapped.ok
    assert swapped.counts["lost"] == swapped.counts["wrong"] == 0
    assert swapped.verify["failed"] == 2 and swapped.verify["max_abs_err"] >= 1.0
