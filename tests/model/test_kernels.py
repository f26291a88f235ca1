import torch

from model.discretize import DPLRBilinear, discretize_zoh
from model.hippo import nplr_legs, s4d_legs
from model.kernels import (
    causal_conv,
    causal_conv_direct,
    causal_conv_reused,
    causal_conv_taps,
    fft_size,
    kernel_diag,
    kernel_dplr,
    kernel_dplr_reference,
)


def test_diagonal_kernel_equals_vandermonde():
    h, n2, length = 3, 8, 500
    a, b = s4d_legs(n2)
    c = torch.randn(h, n2, dtype=torch.complex128)
    da, db = discretize_zoh(a.expand(h, n2), b.expand(h, n2),
                            torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64))
    powers = da[:, :, None] ** torch.arange(length)  # (H, N2, L)
    expected = 2 * (c[:, :, None] * db[:, :, None] * powers).sum(1).real
    assert torch.allclose(kernel_diag(da, db, c, length), expected, atol=1e-12)


def test_dplr_kernel_equals_stepping_an_impulse():
    h, n2, length = 2, 8, 300
    lam, p, b = nplr_legs(2 * n2)
    lam, b, p = lam.expand(h, n2), b.expand(h, n2), torch.stack([p, 0.3 * p]).unsqueeze(1)
    p = p.expand(2, h, n2)
    c = torch.randn(h, n2, dtype=torch.complex128)
    dt = torch.tensor([0.01, 0.2], dtype=torch.float64)
    fast = kernel_dplr(lam, p, b, c, dt, length)
    slow = kernel_dplr_reference(DPLRBilinear.build(lam, p, b, dt), c, length)
    assert torch.allclose(fast, slow, atol=1e-10)


def test_fft_and_direct_causal_convolutions_agree():
    u = torch.randn(2, 100, 3)
    k = torch.randn(3, 100)
    n = fft_size(100)
    assert n >= 200
    y = causal_conv(u, torch.fft.rfft(k, n=n), n)
    assert torch.allclose(y, causal_conv_direct(u, k), atol=1e-4)
    v = u.clone()
    v[:, 60:] += 1  # causality: outputs before 60 unchanged
    assert torch.allclose(causal_conv(v, torch.fft.rfft(k, n=n), n)[:, :60], y[:, :60],
                          atol=1e-5)


def test_training_convolution_has_the_same_values_and_gradients():
    """causal_conv_taps' hand-written backward against autograd through causal_conv."""
    torch.manual_seed(0)
    u = torch.randn(3, 37, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 37, dtype=torch.float64, requires_grad=True)
    n = fft_size(37)
    assert torch.autograd.gradcheck(lambda u, k: causal_conv_taps(u, k, n), (u, k))
    weights = torch.randn(3, 37, 4, dtype=torch.float64)
    (causal_conv_taps(u, k, n) * weights).sum().backward()
    fast = u.grad.clone(), k.grad.clone()
    u.grad = k.grad = None
    (causal_conv(u, torch.fft.rfft(k, n=n), n) * weights).sum().backward()
    assert torch.allclose(fast[0], u.grad, atol=1e-10)
    assert torch.allclose(fast[1], k.grad, atol=1e-10)
    assert torch.allclose(causal_conv_taps(u, k, n), causal_conv_direct(u, k), atol=1e-10)


def test_blocked_kernels_stay_exact_at_long_lengths():
    """L = 16000: the blocked products vs direct powers (diagonal) and stepping (DPLR)."""
    h, n2, length = 2, 4, 16000
    a, b = s4d_legs(n2)
    c = torch.randn(h, n2, dtype=torch.complex128)
    da, db = discretize_zoh(a.expand(h, n2), b.expand(h, n2),
                            torch.tensor([1e-3, 3e-2], dtype=torch.float64))
    expected = 2 * (c[:, :, None] * db[:, :, None]
                    * da[:, :, None] ** torch.arange(length)).sum(1).real  # (H, L)
    assert (kernel_diag(da, db, c, length) - expected).abs().max() < 1e-12
    lam, p, b = nplr_legs(2 * n2)
    lam, b, p = lam.expand(h, n2), b.expand(h, n2), p.expand(1, h, n2)
    dt = torch.tensor([1e-3, 3e-2], dtype=torch.float64)
    fast = kernel_dplr(lam, p, b, c, dt, length)
    slow = kernel_dplr_reference(DPLRBilinear.build(lam, p, b, dt), c, length)
    assert (fast - slow).abs().max() < 1e-10


def test_reused_buffers_give_the_same_convolution_for_every_shape_in_turn():
    """The inference conv reuses one set of buffers per thread: a long call, then a shorter
    one, then the long one again each equal the plain conv (no stale samples past L)."""
    k = torch.randn(3, 300)
    for length, batch in ((300, 2), (120, 2), (300, 1), (300, 2)):
        u = torch.randn(batch, length, 3)
        n = fft_size(length)
        k_f = torch.fft.rfft(k[:, :length], n=n).to(torch.complex64)
        got = causal_conv_reused(u, k_f, n)  # (B, H, L)
        assert got.shape == (batch, 3, length)
        assert torch.allclose(got.transpose(1, 2), causal_conv(u, k_f, n), rtol=0, atol=1e-6)
