"""The per-sample path steps a session's queued one-sample frames as one block: the numbers
of single steps bit for bit, one sink call per session, and a block refused for a NaN is
retried frame by frame so that only the bad frame is refused."""

import asyncio
import math

import numpy as np
import pytest
import torch

from model.checkpoint import save_model
from server.backends import load_backend
from server.metrics import Metrics
from server.scheduler import Control, Frame, Scheduler
from server.slots import SlotPool
from tests.model.conftest import perturbed_network


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int], np.ndarray | None]] = []

    def frame_done(self, frame, outputs):
        self.calls.append(("one", [frame.seq], outputs.copy()))

    def frames_done(self, frames, outputs):
        self.calls.append(("block", [f.seq for f in frames], outputs.copy()))

    def frame_failed(self, frame, exc):
        self.calls.append(("failed", [frame.seq], None))

    def control_done(self, item, value):
        self.calls.append((item.kind, [item.seq], None))

    def work_dropped(self, items):
        pass

    def outputs(self) -> dict[int, np.ndarray]:
        return {seq: out[i] for kind, seqs, out in self.calls if out is not None
                for i, seq in enumerate(seqs)}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    net = perturbed_network(layer="s4d", task="sequence", d_output=2)
    save_model(net, root / "m")
    backend = load_backend("torch", root / "m", "cpu", step_compiler="native",
                           compile_cache=root / "cache")
    backend.warmup()
    assert backend.rows_in_place
    return backend


def _scheduler(backend, rows: int = 4) -> tuple[Scheduler, SlotPool]:
    scheduler = Scheduler(Metrics(None))
    scheduler.start(asyncio.new_event_loop())  # never run: ticks are called by hand
    return scheduler, SlotPool(backend, rows)


def _stream(scheduler, pool, sink):
    stream = scheduler.open(pool, 1.0, False, None)
    stream.sink = sink
    return stream


def test_queued_one_sample_frames_are_one_block_with_the_numbers_of_single_steps(backend):
    u = np.random.default_rng(1).standard_normal((2, 7, backend.info.d_input)).astype("<f4")
    scheduler, pool = _scheduler(backend)
    sinks = [Sink(), Sink()]
    streams = [_stream(scheduler, pool, sink) for sink in sinks]
    for s, (stream, x) in enumerate(zip(streams, u, strict=True)):
        for t in range(7 - 4 * s):  # 7 frames and 3 frames
            scheduler.submit(stream, Frame(x[t:t + 1], t, 0.0, False))
    scheduler._tick()
    assert [(kind, seqs) for kind, seqs, _ in sinks[0].calls] == [("block", list(range(7)))]
    assert [(kind, seqs) for kind, seqs, _ in sinks[1].calls] == [("block", [0, 1, 2])]
    assert [stream.samples for stream in streams] == [7, 3]

    twin, twin_pool = _scheduler(backend)
    twins = [_stream(twin, twin_pool, Sink()) for _ in range(2)]
    for t in range(7):  # one frame per tick: single steps
        for s, stream in enumerate(twins):
            if t < 7 - 4 * s:
                twin.submit(stream, Frame(u[s, t:t + 1], t, 0.0, False))
        twin._tick()
    for sink, single in zip(sinks, twins, strict=True):
        got, want = sink.outputs(), single.sink.outputs()
        assert sorted(got) == sorted(want)
        assert all(np.array_equal(got[seq], want[seq]) for seq in got)
    assert torch.equal(pool.flat32[:2], twin_pool.flat32[:2])
    assert torch.equal(pool.flat64[:2], twin_pool.flat64[:2])
    model = scheduler._models[pool]
    assert model.queued == 0 and model.queued_bytes == 0


def test_a_block_stops_at_a_control_item_and_at_a_longer_frame(backend):
    d = backend.info.d_input
    scheduler, pool = _scheduler(backend)
    sink = Sink()
    stream = _stream(scheduler, pool, sink)
    one = np.ones((1, d), np.float32)
    for seq in range(3):
        scheduler.submit(stream, Frame(one, seq, 0.0, False))
    scheduler.submit(stream, Control("snapshot"))
    scheduler.submit(stream, Frame(one, 3, 0.0, False))
    scheduler.submit(stream, Frame(np.ones((3, d), np.float32), 4, 0.0, False))
    scheduler._tick()
    assert [(kind, seqs) for kind, seqs, _ in sink.calls] == [
        ("block", [0, 1, 2]), ("snapshot", [None]), ("one", [3]), ("one", [4])]
    assert stream.samples == 7


def test_a_block_with_a_nan_refuses_only_that_frame(backend):
    d = backend.info.d_input
    u = np.random.default_rng(2).standard_normal((5, d)).astype("<f4")
    bad = u.copy()
    bad[2, 0] = math.nan
    scheduler, pool = _scheduler(backend)
    sink = Sink()
    stream = _stream(scheduler, pool, sink)
    for seq in range(5):
        scheduler.submit(stream, Frame(bad[seq:seq + 1], seq, 0.0, False))
    scheduler._tick()
    kinds = [(kind, seqs) for kind, seqs, _ in sink.calls]
    # the refused block's frames, one at a time
    assert kinds == [("one", [0]), ("one", [1]), ("error", [2]), ("one", [3]), ("one", [4])]
    assert stream.samples == 4

    twin, twin_pool = _scheduler(backend)
    clean = _stream(twin, twin_pool, Sink())
    for seq in (0, 1, 3, 4):
        twin.submit(clean, Frame(u[seq:seq + 1], seq, 0.0, False))
    twin._tick()
    got, want = sink.outputs(), clean.sink.outputs()
    assert sorted(got) == sorted(want) == [0, 1, 3, 4]
    assert all(np.array_equal(got[seq], want[seq]) for seq in got)
    assert torch.equal(pool.flat32[0], twin_pool.flat32[0])
