"""The bench's reading of a mux run's steady part: which messages were due in it and the
server CPU spent in it."""

import pytest

from loadtest.bench.mux_bench import CpuTrace, steady_window
from loadtest.mux_load import MuxLoadConfig


def test_the_steady_window_counts_the_session_samples_due_in_it():
    cfg = MuxLoadConfig(url="http://127.0.0.1:1", model="m", gateways=2, rate=10.0, hold_s=3.0,
                        sessions_per_gateway=5, frame=2)
    a, b, samples = steady_window(cfg, start=100.0)
    assert (a, b) == (101.0, 102.5)
    # gateway 0 sends at 100.0 + k/10 and gateway 1 at 100.05 + k/10: k = 10..24 for both
    assert samples == 2 * 15 * 5 * 2
    short = cfg.model_copy(update={"hold_s": 1.0})
    assert steady_window(short, start=0.0)[2] == 0  # no steady part in a 1 s hold


def test_cpu_between_two_times_is_interpolated_between_samples():
    trace = CpuTrace(pid=0)
    trace.points = [(10.0, 1.0), (11.0, 1.5), (12.0, 3.5)]
    assert trace.between(10.0, 12.0) == pytest.approx(2.5)
    assert trace.between(10.5, 11.5) == pytest.approx(1.25)  # from 1.25 to 2.5
