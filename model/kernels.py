"""Convolution kernels K = (C B̄, C Ā B̄, C Ā² B̄, ...) and the causal FFT convolution.

Kernels are computed in complex128 as blocked matrix products: with l = m·T + j (T ≈ √L),
K_l = C Ā^{mT} · Ā^j B̄, so the L taps of a channel are one (T × N) @ (N × M) GEMM between a few
small tables. float64 keeps them at rounding level at L = 16000 (float32 Cauchy sums, the
official fallback, lose about 1e-2 there); the GEMM form is 20-25x faster than evaluating
Cauchy sums at the roots of unity (S4 paper, Algorithm 1), which this module used before.
"""

from __future__ import annotations

import math
import threading

import torch

from model.discretize import DPLRBilinear


def conj_extend(x: torch.Tensor) -> torch.Tensor:
    """Append the implied conjugate half along the last axis: (..., N2) -> (..., N)."""
    return torch.cat([x, x.conj()], dim=-1)


def kernel_diag(da: torch.Tensor, db: torch.Tensor, c: torch.Tensor, length: int) -> torch.Tensor:
    """K_l = 2·Re Σ_n C_n B̄_n Ā_n^l for l < L, diagonal Ā (H, N2). Returns (H, L) float64.

    Blocked Vandermonde: with l = m·T + j, Ā^l = Ā^{mT} Ā^j, so the kernel of each channel is
    one complex GEMM, W (M, N2) @ P (N2, T), with W_mn = 2 C_n B̄_n Ā_n^{mT} and P_nj = Ā_n^j.
    Every power is exp(l·log Ā) in complex128 (no repeated products, so no error growth).
    """
    h = da.shape[0]
    block = max(1, math.isqrt(length))  # T ≈ √L balances the two small tables
    rows = -(-length // block)  # M
    log_a = torch.log(da)  # (H, N2)
    j = torch.arange(block, dtype=torch.float64)  # (T,)
    m = torch.arange(rows, dtype=torch.float64) * block  # (M,)
    inner = torch.exp(log_a[:, :, None] * j)  # (H, N2, T) Ā^j
    outer = (2 * c * db)[:, None, :] * torch.exp(log_a[:, None, :] * m[:, None])  # (H, M, N2)
    return torch.matmul(outer, inner).real.reshape(h, rows * block)[:, :length]  # (H, L)


def dplr_transition(lam: torch.Tensor, p: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Dense bilinear Ā over the conjugate-extended state, (H, N, N).

    Used only where a matrix power is unavoidable (kernels, chunk transitions), never in the
    per-sample step.
    """
    return _dense_bilinear(lam, p, dt)[0]


def _dense_bilinear(lam: torch.Tensor, p: torch.Tensor, dt: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ā = (2/dt - A)⁻¹(2/dt + A) (H, N, N), the left factor 2/dt - A, and A."""
    lam_e = conj_extend(lam)  # (H, N)
    p_e = conj_extend(p)  # (R, H, N)
    a = torch.diag_embed(lam_e) - torch.einsum("rhi,rhj->hij", p_e, p_e.conj())  # (H, N, N)
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    two_dt = (2 / dt)[:, None, None]  # (H, 1, 1)
    left = two_dt * eye - a  # (H, N, N)
    return torch.linalg.solve(left, two_dt * eye + a), left, a


def kernel_dplr(lam: torch.Tensor, p: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                dt: torch.Tensor, length: int) -> torch.Tensor:
    """Bilinear DPLR kernel K_l = Re c_e Ā^l B̄_e for l < L, (H, L) float64.

    Blocked: rows c Ā^j (j < T, by doubling with Ā, Ā², Ā⁴, ...), columns Ā^{mT} B̄ (m < M,
    one matrix-vector product each with the last power Ā^T), then one GEMM rows @ columns.
    """
    transition, left, _ = _dense_bilinear(lam, p, dt)  # (H, N, N)
    b_bar = torch.linalg.solve(left, 2 * conj_extend(b)[..., None])  # (H, N, 1) B̄
    block = 1 << max(0, (math.isqrt(length) - 1).bit_length())  # T: a power of two ≈ √L
    rows = conj_extend(c)[:, None, :]  # (H, 1, N) c Ā^0
    power = transition  # Ā^{len(rows)}
    while rows.shape[1] < block:
        rows = torch.cat([rows, rows @ power], dim=1)  # (H, 2t, N)
        power = power @ power
    cols = [b_bar]  # Ā^{mT} B̄
    for _ in range(-(-length // block) - 1):
        cols.append(power @ cols[-1])
    k = (rows @ torch.cat(cols, dim=2)).real  # (H, T, M): K at m·T + j is k[:, j, m]
    return k.transpose(1, 2).reshape(k.shape[0], -1)[:, :length]  # (H, L)


def kernel_dplr_reference(step: DPLRBilinear, c: torch.Tensor, length: int) -> torch.Tensor:
    """K by running the Woodbury recurrence on an impulse: O(L·N), slow but obviously right."""
    x = step.resolve(step.b2)  # (H, N2) B̄ = 2 (2/dt - A)⁻¹ B
    out = []
    for _ in range(length):
        out.append(2 * (c * x).sum(-1).real)  # (H,)
        x = step.step(x, None)
    return torch.stack(out, dim=-1)  # (H, L)


def fft_size(length: int) -> int:
    """A fast FFT length ≥ 2L so the circular convolution is causal: the next power of two,
    unless a 2·3·5-smooth size is at most 3/4 of it (pocketfft runs powers of two about twice
    as fast per point: 32768 points took half the time of 32000 here)."""
    n = 2 * length
    power = 1 << (n - 1).bit_length()
    best = power
    for p3 in (1, 3, 9, 27):
        for p5 in (1, 5, 25):
            m = p3 * p5
            size = m * (1 << max(0, math.ceil(math.log2(n / m))))
            if n <= size < best:
                best = size
    return best if best <= 0.75 * power else power


def causal_conv(u: torch.Tensor, k_f: torch.Tensor, n_fft: int) -> torch.Tensor:
    """y_t = Σ_{s≤t} K_{t-s} u_s along dim 1. u (B, L, H), k_f = rfft(K, n_fft) laid out (H, F).

    The FFTs run along the last, contiguous axis: time-major (B, L, H) FFTs along dim 1 took
    2.4x as long here. The result is a (B, L, H) view of a (B, H, L) tensor."""
    length = u.shape[1]
    u_f = torch.fft.rfft(u.transpose(1, 2), n=n_fft)  # (B, H, F)
    return torch.fft.irfft(u_f * k_f, n=n_fft)[..., :length].transpose(1, 2)  # (B, L, H)


class _CausalConvTaps(torch.autograd.Function):
    """y = causal_conv(u, rfft(k)) with a hand-written backward: both gradients are FFT
    correlations, grad_u = irfft(rfft(g)·conj(K)) and grad_k = irfft(Σ_b conj(U)·rfft(g)),
    the batch summed before the kernel's inverse FFT. Autograd through rfft(u, n) zero-padded,
    sliced and copied the (B, H, n) tensors several times (half of a training step's time)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor, n_fft: int) -> torch.Tensor:
        length = u.shape[1]
        u_f = torch.fft.rfft(u.transpose(1, 2), n=n_fft)  # (B, H, F)
        k_f = torch.fft.rfft(k, n=n_fft)  # (H, F)
        ctx.save_for_backward(u_f, k_f)
        ctx.length, ctx.n_fft = length, n_fft
        y = torch.fft.irfft(u_f * k_f, n=n_fft)[..., :length]  # (B, H, L)
        # time-major and dense: GELU's backward on a transposed view ran ~5x slower
        return y.transpose(1, 2).contiguous()  # (B, L, H)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u_f, k_f = ctx.saved_tensors
        length, n_fft = ctx.length, ctx.n_fft
        g_f = torch.fft.rfft(grad.transpose(1, 2), n=n_fft)  # (B, H, F)
        grad_u = grad_k = None
        if ctx.needs_input_grad[0]:  # correlation: Σ_{t≥s} g_t K_{t-s}; wrapped lags hit zeros
            grad_u = torch.fft.irfft(g_f * k_f.conj(), n=n_fft)[..., :length].transpose(1, 2)
        if ctx.needs_input_grad[1]:  # Σ_b Σ_t g_t u_{t-j}
            grad_k = torch.fft.irfft((g_f * u_f.conj()).sum(0), n=n_fft)[..., :length]
        return grad_u, grad_k, None


def causal_conv_taps(u: torch.Tensor, k: torch.Tensor, n_fft: int) -> torch.Tensor:
    """`causal_conv(u, rfft(k, n_fft), n_fft)` for training: u (B, L, H), k (H, L) -> (B, L, H),
    differentiable in both with a cheaper backward (see _CausalConvTaps)."""
    return _CausalConvTaps.apply(u, k, n_fft)


_held = threading.local()  # each thread's buffers for the conv view without autograd


def reused_buffer(name: str, shape: tuple[int, ...], device: torch.device,
                  zeros: bool = False, tag: object = None) -> torch.Tensor:
    """This thread's float32 buffer `name` of that shape (and `tag`), kept until asked for with
    another (a predict worker reuses one set from request to request instead of allocating
    15-35 MB tensors per layer, which cost page faults and left the heap fragmented)."""
    held = _held.__dict__.setdefault("named", {})
    key = (shape, device, tag)
    if name not in held or held[name][0] != key:
        held.pop(name, None)  # the old one goes before the new one is taken
        made = torch.zeros if zeros else torch.empty
        # a normal tensor even under inference_mode, so a later no_grad call may write it
        with torch.inference_mode(False):
            held[name] = (key, made(shape, device=device))
    return held[name][1]


def causal_conv_reused(u: torch.Tensor, k_f: torch.Tensor, n_fft: int) -> torch.Tensor:
    """`causal_conv` for inference, channels first: u (B, L, H) -> y (B, H, L), the same sums.

    The input goes, transposed, into a (B, H, n) buffer that this thread keeps, whose zero
    padding is written once (`rfft(x, n)` copied and zero-filled a padded tensor every call:
    a fifth of the forward), and the spectrum is multiplied in place. The FFTs' outputs are new
    tensors: torch's `out=` variants compute into a temporary and copy it over, which was
    slower and saved no memory."""
    batch, length, channels = u.shape
    # one buffer per length: its zeros past L must stay zeros (bit-identical answers)
    signal = reused_buffer("signal", (batch, channels, n_fft), u.device, zeros=True,
                           tag=length)
    signal[..., :length].copy_(u.transpose(1, 2))  # (B, H, L); the rest stays zero
    spectrum = torch.fft.rfft(signal)  # (B, H, F)
    spectrum.mul_(k_f)
    return torch.fft.irfft(spectrum, n=n_fft)[..., :length]  # (B, H, L)


def causal_conv_direct(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The same convolution as a Toeplitz product, real ops only (ONNX). k (H, T), u (B, T, H)."""
    t = u.shape[1]
    idx = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # (T, T) t - s
    toeplitz = k[:, idx.clamp(min=0)] * (idx >= 0).to(k.dtype)  # (H, T, T)
    return torch.einsum("hts,bsh->bth", toeplitz, u)  # (B, T, H)
