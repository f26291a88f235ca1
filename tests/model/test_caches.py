"""The derived forms a network keeps (recurrences by rate, kernel spectra by length and rate):
least recently used first out, rebuilt when a parameter changes, not carried by copies."""

import copy
import pickle

import torch

import model.ssm
from tests.model.conftest import perturbed_network


def test_recurrences_by_rate_least_recently_used_first_out():
    net = perturbed_network(task="regression", d_model=4, n_layers=1, d_state=8)
    net.recurrent_cache_size = 2
    at_1, at_half = net.recurrent(1.0), net.recurrent(0.5)
    assert net.recurrent(1.0) is at_1  # used again: now the most recent
    net.recurrent(2.0)  # evicts 0.5, the least recently used
    assert net.recurrent(1.0) is at_1
    assert net.recurrent(0.5) is not at_half
    with torch.no_grad():
        net.blocks[0].layer.D.add_(1.0)
    assert net.recurrent(1.0) is not at_1  # a changed parameter: a new recurrence


def test_copies_keep_the_cache_size_not_its_contents():
    net = perturbed_network(task="regression", d_model=4, n_layers=1, d_state=8)
    net.recurrent_cache_size = 3
    net.recurrent(1.0)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert twin.recurrent_cache_size == 3
        assert len(twin._recurrent_cache) == 0
        u = torch.randn(1, 5, net.config.d_input)
        assert torch.allclose(twin.recurrent(1.0).chunk(u, twin.recurrent(1.0).initial_state(1))[0],
                              net.recurrent(1.0).chunk(u, net.recurrent(1.0).initial_state(1))[0])


def test_kernel_spectra_bounded_in_bytes_and_least_recently_used_first_out(monkeypatch):
    entry = 4 * (256 // 2 + 1) * 8  # H=4 rows of an rfft of 256 points (lengths 100-128)
    monkeypatch.setattr(model.ssm, "KERNEL_CACHE_BYTES", 3 * entry)
    net = perturbed_network(task="regression", d_model=4, n_layers=1, d_state=8).eval()
    layer = net.blocks[0].layer
    with torch.no_grad():
        first, _ = layer.kernel_fft(100, 1.0)
        assert layer._kernels.currsize == entry
        layer.kernel_fft(101, 1.0), layer.kernel_fft(102, 1.0)
        assert layer.kernel_fft(100, 1.0)[0] is first  # still held; now the most recent
        layer.kernel_fft(103, 1.0)  # evicts 101, not 100
        assert layer.kernel_fft(100, 1.0)[0] is first
        assert len(layer._kernels) == 3 and (101, 1.0) not in {k[:2] for k in layer._kernels}
        # one spectrum larger than the whole budget is computed, not kept
        long, n_fft = layer.kernel_fft(5000, 1.0)
        assert long.shape == (4, n_fft // 2 + 1)
        assert layer._kernels.currsize == 3 * entry and len(layer._kernels) == 3
        assert layer.kernel_fft(5000, 1.0)[0] is not long
