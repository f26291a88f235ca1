"""The native S4D step (model/native_step.c): the eager step's numbers for every network option,
rate and batch, in place on strided pool rows, and a rejected row left exactly as it was."""

import math
import platform

import numpy as np
import pytest
import torch

from model import native_step
from model.fused import StateLayout
from model.native_build import PORTABLE_CPU_FLAGS, build_portable, cpu_flags
from model.native_step import NativeStep, library, unsupported
from tests.model.conftest import perturbed_network

pytestmark = pytest.mark.skipif(unsupported(perturbed_network(layer="s4d").to_recurrent())
                                is not None, reason="needs a C compiler")

OPTIONS = {
    "classification": dict(task="classification", labels=list("abcde")),
    "sequence": dict(task="sequence", d_output=2),
    "postnorm": dict(prenorm=False, task="classification", labels=list("abcde")),
    "plain": dict(norm="none", residual=False, task="sequence"),
    "channels": dict(channels=3, task="sequence"),
    "identity ends": dict(encoder=False, decoder=False, d_input=16, d_output=16,
                          task="sequence"),
    # d_model 40: the output linear's 80 outputs are one register tile and a remainder;
    # d_state 20: 10 modes are one vector of 8 and two on their own
    "odd sizes": dict(d_model=40, d_state=20, task="classification", labels=list("abcde")),
    # d_model 20: 40 outputs, not whole 16-wide tiles: a tile's linear goes row by row
    "narrow": dict(d_model=20, d_state=20, task="sequence"),
}


def _random_state(rec, batch: int) -> list[torch.Tensor]:
    state = [torch.randn_like(s) * 0.3 for s in rec.initial_state(batch)]
    if rec.pooled:  # a running sum and a count as after a few hundred samples
        state[-2] = torch.randn_like(state[-2]) * 50
        state[-1] = torch.full_like(state[-1], 300.0)
    return state


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


def _classifier(cache):
    """(net, its recurrence at rate 1, layout, native step) for a small classifier."""
    net = perturbed_network(layer="s4d", task="classification", labels=list("abcde"))
    rec = net.to_recurrent(1.0)
    layout = StateLayout.of(rec.state_spec)
    return net, rec, layout, NativeStep(rec, layout, cache)


@pytest.mark.parametrize("option", OPTIONS)
def test_native_step_matches_the_eager_step(option, cache):
    net = perturbed_network(layer="s4d", **OPTIONS[option])
    template = net.to_recurrent(1.0)
    layout = StateLayout.of(template.state_spec)
    step = NativeStep(template, layout, cache)
    for rate in (1.0, 0.5, 3.0):  # one library, every rate: a rate's tables are bound to it
        rec = net.to_recurrent(rate)
        for batch in (1, 7):
            state = _random_state(rec, batch)
            u = torch.randn(batch, net.config.d_input)
            expected_y, expected_state = rec.step(u, state)
            flat32, flat64 = layout.join(state)
            y, new32, new64 = step(rec, u, flat32, flat64)
            assert new32 is flat32 and new64 is flat64  # advanced in place
            torch.testing.assert_close(y, expected_y, atol=2e-6, rtol=1e-5)
            for got, want in zip(layout.split(new32, new64), expected_state, strict=True):
                torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_a_long_stream_of_native_steps_equals_the_convolutional_view(cache):
    net, rec, layout, step = _classifier(cache)
    u = torch.randn(2, 1500, net.config.d_input)
    flat32, flat64 = layout.join(rec.initial_state(2))
    ys = [step(rec, u[:, t], flat32, flat64)[0] for t in range(u.shape[1])]
    with torch.no_grad():
        expected = net(u)  # (2, L, d_output), FFT convolution
    assert (torch.stack(ys, 1) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("steps", [1, 7, 32, 33, 320])
def test_a_native_chunk_is_its_steps_and_matches_the_chunked_recurrence(steps, cache):
    net, rec, layout, step = _classifier(cache)
    state = _random_state(rec, 3)
    u = torch.randn(3, steps, net.config.d_input)
    expected_y, expected_state = rec.chunk(u, state)  # FFT and state tables, not steps
    flat32, flat64 = layout.join(state)
    one32, one64 = flat32.clone(), flat64.clone()
    y, new32, new64 = step.chunk(rec, u, flat32, flat64)
    assert new32 is flat32 and new64 is flat64
    torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-4)
    want32, want64 = layout.join(expected_state)
    torch.testing.assert_close(flat32, want32, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(flat64, want64, atol=1e-5, rtol=1e-6)  # sums of those
    ys = [step(rec, u[:, t], one32, one64)[0] for t in range(steps)]
    if steps <= 32:  # short blocks are their steps, to the bit
        assert torch.equal(torch.stack(ys, 1), y) and torch.equal(one32, flat32)
    else:  # a long block keeps its state in float64 until its end
        torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one32, flat32, atol=1e-5, rtol=1e-4)


def test_native_blocks_of_a_16khz_model_stay_within_float64_reach(cache):
    """The shipped digits model has modes with |Ā| near 1 at 16 kHz: rounding the state to
    float32 at every sample drifts its outputs from float64 over 16000 samples; blocks of 320
    samples (20 ms audio frames) round once per block and stay within 5e-7 of the largest
    output (v1: 1.5e-5 with outputs up to 39.5; v2: 3.4e-5 with outputs up to 124)."""
    from pathlib import Path

    from model.checkpoint import load_model

    zoo = Path(__file__).resolve().parents[2] / "model" / "zoo" / "digits"
    net = load_model(zoo).eval()
    rec = net.to_recurrent(1.0)
    layout = StateLayout.of(rec.state_spec)
    step = NativeStep(rec, layout, cache)
    torch.manual_seed(0)
    t = torch.arange(16000) / 16000.0
    u = (0.5 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.randn(16000))[None, :, None]
    with torch.no_grad():
        reference = load_model(zoo).eval().double()(u.double())
    flat32, flat64 = layout.join(rec.initial_state(1))
    y = torch.cat([step.chunk(rec, u[:, s:s + 320], flat32, flat64)[0]
                   for s in range(0, 16000, 320)], 1)
    scale = reference.abs().max().item()
    assert (y.double() - reference).abs().max().item() < 5e-7 * max(scale, 1.0)


def test_a_chunk_with_one_bad_sample_leaves_its_row_whole(cache):
    net, rec, layout, step = _classifier(cache)
    flat32, flat64 = layout.join(_random_state(rec, 2))
    before32, before64 = flat32.clone(), flat64.clone()
    u = torch.randn(2, 50, net.config.d_input)
    u[0, 30, 0] = math.nan  # late in the block: the first 30 samples must not stick either
    step.chunk(rec, u, flat32, flat64)
    assert torch.equal(flat32[0], before32[0]) and torch.equal(flat64[0], before64[0])
    assert not torch.equal(flat32[1], before32[1])


def test_only_the_given_rows_of_a_pool_change(cache):
    net, rec, layout, step = _classifier(cache)
    pool32, pool64 = layout.join(_random_state(rec, 10))
    before32, before64 = pool32.clone(), pool64.clone()
    u = torch.randn(4, net.config.d_input)
    expected_y, expected_state = rec.step(u, layout.split(pool32[3:7], pool64[3:7]))
    y, _, _ = step(rec, u, pool32[3:7], pool64[3:7])  # a run of rows: views into the pool
    torch.testing.assert_close(y, expected_y, atol=2e-6, rtol=1e-5)
    want32, want64 = layout.join(expected_state)
    torch.testing.assert_close(pool32[3:7], want32, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(pool64[3:7], want64, atol=2e-6, rtol=1e-5)  # sums of float32
    for rows in (slice(0, 3), slice(7, 10)):
        assert torch.equal(pool32[rows], before32[rows])
        assert torch.equal(pool64[rows], before64[rows])


def test_rows_anywhere_in_a_pool_step_where_they_lie(cache):
    net, rec, layout, step = _classifier(cache)
    pool32, pool64 = layout.join(_random_state(rec, 10))
    before32, before64 = pool32.clone(), pool64.clone()
    rows = np.array([7, 2, 5])  # scattered, not ascending
    u = torch.randn(3, net.config.d_input)
    expected_y, expected_state = rec.step(u, layout.split(pool32[rows], pool64[rows]))
    y, kept = np.empty((3, net.config.d_output), np.float32), np.empty(3, np.uint8)
    assert step.at_rows_into(rec, u.numpy(), pool32, pool64, rows, y, kept) == 3
    torch.testing.assert_close(torch.from_numpy(y), expected_y, atol=2e-6, rtol=1e-5)
    want32, want64 = layout.join(expected_state)
    torch.testing.assert_close(pool32[rows], want32, atol=2e-6, rtol=1e-5)
    # the running mean sums float32 features, which agree within float32 rounding
    torch.testing.assert_close(pool64[rows], want64, atol=2e-6, rtol=1e-5)
    others = np.setdiff1d(np.arange(10), rows)
    assert torch.equal(pool32[others], before32[others])
    assert torch.equal(pool64[others], before64[others])
    with pytest.raises(ValueError, match="rows must lie"):
        step.at_rows_into(rec, u.numpy(), pool32, pool64, np.array([1, 2, 10]), y, kept)
    with pytest.raises(ValueError, match="one index per input"):
        step.at_rows_into(rec, u.numpy(), pool32, pool64, np.array([1, 2]), y, kept)


def _pool_and_twin(cache):
    """The classifier, a pool of 10 random rows and a copy of it."""
    net, rec, layout, step = _classifier(cache)
    pool32, pool64 = layout.join(_random_state(rec, 10))
    return net, rec, step, pool32, pool64, pool32.clone(), pool64.clone()


@pytest.mark.parametrize("option", ["classification", "postnorm", "plain", "channels",
                                    "odd sizes", "narrow"])
def test_a_batch_goes_layer_by_layer_with_the_numbers_of_rows_one_at_a_time(option, cache):
    """A step of many rows runs layer by layer over tiles of rows (a layer's weights stay in
    cache across the tile): each row's outputs and state bit for bit those of the row stepped
    alone; a row with a NaN input, in the middle of a tile, is left as it was."""
    net = perturbed_network(layer="s4d", **OPTIONS[option])
    rec = net.to_recurrent(1.0)
    layout = StateLayout.of(rec.state_spec)
    step = NativeStep(rec, layout, cache)
    pool32, pool64 = layout.join(_random_state(rec, 20))
    twin32, twin64 = pool32.clone(), pool64.clone()
    d_in, d_out = net.config.d_input, net.config.d_output
    rows = np.array([19, 3, 0, 7, 12, 5, 1, 18, 9, 2, 15], np.int64)  # a tile and a part
    u = np.random.default_rng(4).standard_normal((len(rows), d_in)).astype(np.float32)
    u[4, 0] = math.nan
    y, kept = np.empty((len(rows), d_out), np.float32), np.empty(len(rows), np.uint8)
    assert step.at_rows_into(rec, u, pool32, pool64, rows, y, kept) == len(rows) - 1
    assert kept.tolist() == [1, 1, 1, 1, 0] + [1] * 6
    for b in range(len(rows)):
        alone, flag = np.empty((1, d_out), np.float32), np.empty(1, np.uint8)
        step.at_rows_into(rec, u[b:b + 1], twin32, twin64, rows[b:b + 1], alone, flag)
        if flag[0]:
            assert np.array_equal(y[b], alone[0])
    assert torch.equal(pool32, twin32) and torch.equal(pool64, twin64)


def test_blocks_of_queued_samples_are_exactly_their_steps(cache):
    """Rows advanced by different numbers of samples in one call (a session's queued
    one-sample frames as one block): the outputs and states of as many single steps, bit for
    bit; a row given 0 samples stays as it was, and a block with one NaN is refused whole."""
    net, rec, step, pool32, pool64, twin32, twin64 = _pool_and_twin(cache)
    d_in, d_out = net.config.d_input, net.config.d_output
    rows, steps = np.array([7, 2, 5, 0]), np.array([3, 1, 0, 2])
    u = np.random.default_rng(3).standard_normal((4, 3, d_in)).astype(np.float32)
    u[3, 1, 0] = math.nan
    y, kept = np.full((4, 3, d_out), 9.0, np.float32), np.empty(4, np.uint8)
    before32, before64 = pool32.clone(), pool64.clone()
    done = step.at_rows_into(rec, u, pool32, pool64, rows, y, kept, steps)
    assert done == 3 and kept.tolist() == [1, 1, 1, 0]
    for b, (row, n) in enumerate(zip(rows.tolist()[:3], steps.tolist()[:3], strict=True)):
        for t in range(n):
            expected = np.empty((1, d_out), np.float32)
            step.at_rows_into(rec, u[b, t][None], twin32, twin64, np.array([row]), expected,
                              np.empty(1, np.uint8))
            assert np.array_equal(y[b, t], expected[0])
    assert torch.equal(pool32, twin32) and torch.equal(pool64, twin64)
    assert torch.equal(pool32[[5, 0]], before32[[5, 0]])  # no samples; the refused block
    assert torch.equal(pool64[[5, 0]], before64[[5, 0]])
    with pytest.raises(ValueError, match=r"steps must lie in \[0, 3\]"):
        step.at_rows_into(rec, u, pool32, pool64, rows, y, kept, np.array([4, 1, 0, 0]))
    with pytest.raises(ValueError, match="contiguous float32"):
        step.at_rows_into(rec, u[:, :2], pool32, pool64, rows, y, kept, steps)
    assert torch.equal(pool32, twin32)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 3e38])
def test_a_row_whose_input_or_output_is_not_finite_is_left_as_it_was(bad, cache):
    """3e38 is finite, but its output is not: that row must not advance either. Eleven rows:
    the bad one in the middle of a tile, whose states are advanced where they lie (the bad
    row's is put back)."""
    net, rec, layout, step = _classifier(cache)
    flat32, flat64 = layout.join(_random_state(rec, 11))
    before32, before64 = flat32.clone(), flat64.clone()
    u = torch.randn(11, net.config.d_input)
    u[5, 0] = bad
    y, _, _ = step(rec, u, flat32, flat64)
    others = [b for b in range(11) if b != 5]
    assert not torch.isfinite(y[5]).all()
    assert torch.equal(flat32[5], before32[5]) and torch.equal(flat64[5], before64[5])
    assert torch.isfinite(y[others]).all()
    assert all(not torch.equal(flat32[b], before32[b]) for b in others)


def test_bad_arguments_are_refused_before_any_row_changes(cache):
    net, rec, layout, step = _classifier(cache)
    flat32, flat64 = layout.join(_random_state(rec, 2))
    before = flat32.clone()
    with pytest.raises(ValueError, match="float32"):
        step(rec, torch.zeros(2, net.config.d_input, dtype=torch.float64), flat32, flat64)
    with pytest.raises(ValueError, match="state rows"):
        step(rec, torch.zeros(3, net.config.d_input), flat32, flat64)
    with pytest.raises(ValueError, match="state rows"):
        step(rec, torch.zeros(2, net.config.d_input), flat32[:, ::2], flat64)
    assert torch.equal(flat32, before)


def test_s4_networks_have_no_native_step(cache):
    rec = perturbed_network(layer="s4").to_recurrent(1.0)
    assert "s4" in unsupported(rec)
    with pytest.raises(ValueError, match="no native step"):
        NativeStep(rec, StateLayout.of(rec.state_spec), cache)


def test_the_library_is_built_once_per_cache(tmp_path):
    first = library(tmp_path)
    built = list(tmp_path.glob("native-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert library(tmp_path) is first
    assert built[0].stat().st_mtime_ns == stamp


@pytest.mark.skipif(platform.machine() != "x86_64" or not cpu_flags() >= PORTABLE_CPU_FLAGS,
                    reason="the portable library is for x86-64 CPUs with AVX2 and FMA")
def test_where_no_compiler_is_the_prebuilt_portable_library_serves(cache, tmp_path,
                                                                   monkeypatch):
    """The container image has no C compiler: the portable library that setup.py puts in the
    wheel serves there, with the numbers of the library built for this CPU; on a CPU without
    its features (or with no library) the step is unsupported, and says why."""
    net, rec, layout, here = _classifier(cache)
    assert build_portable(tmp_path) is not None
    monkeypatch.setattr(native_step, "PREBUILT_DIR", tmp_path)
    monkeypatch.setattr(native_step, "c_compiler", lambda: None)
    assert unsupported(rec) is None
    portable = NativeStep(rec, layout, tmp_path / "no-cache")
    assert not (tmp_path / "no-cache").exists()  # nothing compiled
    flat32, flat64 = layout.join(_random_state(rec, 11))
    twin32, twin64 = flat32.clone(), flat64.clone()
    u = torch.randn(11, net.config.d_input)
    y_here, _, _ = here(rec, u, flat32, flat64)
    y_portable, _, _ = portable(rec, u, twin32, twin64)
    # Built for a CPU with AVX-512 (Zen 4, recent Xeons), the native library adds its sums
    # over wider vectors than the portable x86-64-v3 one, so the two round differently in the
    # last bits; where the native build has the portable one's vectors they are the same code.
    if "avx512f" in cpu_flags():
        def same(a, b):
            return torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
        same = torch.equal
    assert same(y_here, y_portable)
    assert same(flat32, twin32) and same(flat64, twin64)
    monkeypatch.setattr(native_step, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
    assert "no C compiler" in unsupported(rec)
    monkeypatch.setattr(native_step, "cpu_flags", cpu_flags)
    monkeypatch.setattr(native_step, "PREBUILT_DIR", tmp_path / "elsewhere")
    assert "no prebuilt library" in unsupported(rec)
