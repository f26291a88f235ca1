"""Band-limited S4D modes and the training augmentation (model/augment.py)."""

import math

import numpy as np
import torch

from model.augment import Augment, augment, change_speed, lowpass
from model.config import ModelConfig
from model.network import S4Network
from model.ssm import S4DLayer, bandlimit_mask


def test_bandlimit_zeroes_exactly_the_modes_above_the_limit():
    torch.manual_seed(0)
    limited = S4DLayer(8, 32, dt_min=0.01, dt_max=0.5, bandlimit=0.5)
    plain = S4DLayer(8, 32, dt_min=0.01, dt_max=0.5)
    plain.load_state_dict(limited.state_dict())
    a, _, _ = plain.continuous()
    cycles = limited.dt(1.0)[:, None] * a.imag.abs() / (2 * math.pi)  # (H, N2)
    high = cycles >= 0.25
    assert 0 < int(high.sum()) < high.numel()  # the test exercises both sides
    assert torch.equal(bandlimit_mask(a, limited.dt(1.0), 0.5), (~high).double())
    with torch.no_grad():
        plain.C[high] = 0
    assert torch.allclose(limited.kernel(256), plain.kernel(256), atol=1e-12)
    # the mask belongs to the trained rate: served at half the rate, the same modes stay
    assert torch.allclose(limited.kernel(64, rate=0.5), plain.kernel(64, rate=0.5), atol=1e-12)


def test_bandlimited_network_views_agree():
    torch.manual_seed(1)
    net = S4Network(ModelConfig(d_input=1, d_output=3, d_model=8, n_layers=2, d_state=16,
                                dt_max=0.5, bandlimit=0.5)).eval()
    u = torch.randn(2, 100, 1)
    rec = net.to_recurrent(0.5)
    with torch.no_grad():
        conv = net(u, rate=0.5)
    chunk, _ = rec.chunk(u, rec.initial_state(2))
    assert (conv - chunk).abs().max() < 1e-4
    assert torch.allclose(net.final(u, 0.5), conv[:, -1], atol=1e-5)


def test_lowpass_removes_everything_above_the_cutoff():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1600, 1)).astype(np.float32)
    y = lowpass(x, np.array([1000.0, 2000.0, 4000.0]), sample_rate=16000)
    freqs = np.fft.rfftfreq(1600, 1 / 16000)
    spectrum = np.abs(np.fft.rfft(y[..., 0], axis=1))
    for row, cutoff in enumerate((1000, 2000, 4000)):
        assert spectrum[row, freqs > cutoff + 20].max() < 1e-3
        assert spectrum[row, freqs < cutoff - 20].min() > 1e-3  # the rest is kept


def test_augment_is_seeded_and_within_its_ranges():
    x = np.random.default_rng(1).standard_normal((64, 800, 1)).astype(np.float32)
    gain_only = Augment(gain_db=(-6, 6))
    y = augment(x, gain_only, 8000, np.random.default_rng(2))
    ratio = np.abs(y).sum(axis=(1, 2)) / np.abs(x).sum(axis=(1, 2))
    assert ratio.min() >= 10 ** (-6 / 20) - 1e-6 and ratio.max() <= 10 ** (6 / 20) + 1e-6
    assert np.array_equal(y, augment(x, gain_only, 8000, np.random.default_rng(2)))
    noisy = augment(x, Augment(noise_prob=1.0, noise_snr_db=(20, 20)), 8000,
                    np.random.default_rng(3))
    snr = 10 * np.log10((x ** 2).mean() / ((noisy - x) ** 2).mean())
    assert abs(snr - 20) < 0.5
    untouched = augment(x, Augment(), 8000, np.random.default_rng(4))
    assert np.array_equal(untouched, x)


def test_speed_change_resamples_in_place_and_pads_with_silence():
    x = np.random.default_rng(5).standard_normal((3, 400, 2)).astype(np.float32)
    y = change_speed(x, np.array([1.0, 2.0, 0.5]))
    assert np.array_equal(y[0], x[0])
    assert np.array_equal(y[1, :200], x[1, ::2]) and not y[1, 200:].any()  # twice as fast
    assert np.allclose(y[2, ::2], x[2, :200]) and np.allclose(  # half as fast: midpoints
        y[2, 1:-1:2], (x[2, :199] + x[2, 1:200]) / 2, atol=1e-6)
    sped = augment(x, Augment(speed_prob=1.0, speed=(1.2, 1.2)), 8000, np.random.default_rng(0))
    assert np.allclose(sped, change_speed(x, np.full(3, 1.2)))


def test_running_mean_blocks_match_float64():
    from model.network import running_mean

    for length in (1, 100, 256, 257, 5000):
        x = torch.randn(2, length, 3) + 3.0  # an offset: the sums grow, float32 would drift
        expected = x.double().cumsum(1) / torch.arange(1, length + 1)[:, None]
        assert (running_mean(x).double() - expected).abs().max() < 1e-5
        assert running_mean(x).dtype == torch.float32
