"""Convolution kernels K = (C B̄, C Ā B̄, C Ā² B̄, ...) and the causal FFT convolution.

Kernels are evaluated as truncated generating functions at the roots of unity (S4 paper,
Algorithm 1) in complex128 and brought back by an inverse FFT: float32 Cauchy sums lose
about 1e-2 at L = 16000, float64 ones stay at rounding level. Frequencies are processed in
blocks so memory stays O(H·N·block) rather than O(H·N·L).
"""

from __future__ import annotations

import math

import torch

from model.discretize import DPLRBilinear

FREQ_BLOCK = 2048


def roots_of_unity(length: int) -> torch.Tensor:
    """z_k = exp(-2πi k / L) for k = 0..L//2 (the half spectrum of a real kernel)."""
    k = torch.arange(length // 2 + 1, dtype=torch.float64)
    return torch.exp(-2j * math.pi * k / length)  # (L//2+1,)


def conj_extend(x: torch.Tensor) -> torch.Tensor:
    """Append the implied conjugate half along the last axis: (..., N2) -> (..., N)."""
    return torch.cat([x, x.conj()], dim=-1)


def kernel_diag(da: torch.Tensor, db: torch.Tensor, c: torch.Tensor, length: int) -> torch.Tensor:
    """K_l = 2·Re Σ_n C_n Ā_n^l B̄_n for l < L, diagonal Ā (H, N2). Returns (H, L) float64.

    Σ_{l<L} Ā^l z^l = (1 - Ā^L z^L)/(1 - Ā z), and z^L = 1 at the roots of unity.
    """
    c_tilde = c * (1 - torch.exp(length * torch.log(da)))  # (H, N2) C(1 - Ā^L)
    w = conj_extend(c_tilde * db)  # (H, N)
    da_e = conj_extend(da)  # (H, N)
    z = roots_of_unity(length)  # (F,)
    spectrum = torch.empty(da.shape[0], z.shape[0], dtype=torch.complex128)  # (H, F)
    for lo in range(0, z.shape[0], FREQ_BLOCK):
        zb = z[lo:lo + FREQ_BLOCK]  # (F',)
        spectrum[:, lo:lo + FREQ_BLOCK] = (w[:, :, None] / (1 - da_e[:, :, None] * zb)).sum(1)
    return torch.fft.irfft(spectrum, n=length)  # (H, L)


def dplr_transition(lam: torch.Tensor, p: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Dense bilinear Ā over the conjugate-extended state, (H, N, N).

    Used only where a matrix power is unavoidable (C̃ = C(I - Ā^L), chunk transitions), never
    in the per-sample step.
    """
    lam_e = conj_extend(lam)  # (H, N)
    p_e = conj_extend(p)  # (R, H, N)
    a = torch.diag_embed(lam_e) - torch.einsum("rhi,rhj->hij", p_e, p_e.conj())  # (H, N, N)
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    two_dt = (2 / dt)[:, None, None]  # (H, 1, 1)
    return torch.linalg.solve(two_dt * eye - a, two_dt * eye + a)  # (H, N, N)


def row_times_power(row: torch.Tensor, mat: torch.Tensor, power: int) -> torch.Tensor:
    """row · mat^power by binary powering, O(N³ log power). row (H, N), mat (H, N, N)."""
    out = row
    square = mat
    while power:
        if power & 1:
            out = torch.einsum("hi,hij->hj", out, square)
        power >>= 1
        if power:
            square = square @ square
    return out


def c_tilde_dplr(c: torch.Tensor, transition: torch.Tensor, length: int) -> torch.Tensor:
    """C̃ = C (I - Ā^L) as a row vector over the extended state; returns the kept half (H, N2)."""
    c_e = conj_extend(c)  # (H, N)
    return (c_e - row_times_power(c_e, transition, length))[:, : c.shape[-1]]


def kernel_dplr(lam: torch.Tensor, p: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                dt: torch.Tensor, length: int) -> torch.Tensor:
    """Bilinear DPLR kernel (H, L) float64 via Cauchy sums and a Woodbury correction.

    With a = 2/dt·(1 - z), β = 1 + z:  K̂(z) = 2 C̃ (a - β A)⁻¹ B, and
    (a - βΛ + β P P*)⁻¹ = R - R βP (I + P* R βP)⁻¹ P* R,  R = diag(1/(a - βΛ)).
    This form has no pole at z = -1, unlike the one written with g = a/β.
    """
    c_t = c_tilde_dplr(c, dplr_transition(lam, p, dt), length)  # (H, N2)
    lam_e, b_e, c_e = conj_extend(lam), conj_extend(b), conj_extend(c_t)  # (H, N) each
    p_e = conj_extend(p)  # (R, H, N)
    z = roots_of_unity(length)  # (F,)
    eye = torch.eye(p.shape[0], dtype=torch.complex128)
    spectrum = torch.empty(lam.shape[0], z.shape[0], dtype=torch.complex128)  # (H, F)
    for lo in range(0, z.shape[0], FREQ_BLOCK):
        zb = z[lo:lo + FREQ_BLOCK]  # (F',)
        a = (2 / dt)[:, None] * (1 - zb)  # (H, F')
        beta = 1 + zb  # (F',)
        r = 1 / (a[:, :, None] - beta[:, None] * lam_e[:, None, :])  # (H, F', N)
        k_cb = torch.einsum("hn,hfn,hn->hf", c_e, r, b_e)  # (H, F')
        k_cp = torch.einsum("hn,hfn,rhn->hfr", c_e, r, p_e)  # (H, F', R)
        k_pb = torch.einsum("rhn,hfn,hn->hfr", p_e.conj(), r, b_e)  # (H, F', R)
        k_pp = torch.einsum("ihn,hfn,jhn->hfij", p_e.conj(), r, p_e)  # (H, F', R, R)
        core = eye + beta[:, None, None] * k_pp  # (H, F', R, R)
        corr = torch.linalg.solve(core, k_pb[..., None])[..., 0]  # (H, F', R)
        spectrum[:, lo:lo + FREQ_BLOCK] = 2 * (k_cb - beta * (k_cp * corr).sum(-1))
    return torch.fft.irfft(spectrum, n=length)  # (H, L)


def kernel_dplr_reference(step: DPLRBilinear, c: torch.Tensor, length: int) -> torch.Tensor:
    """K by running the Woodbury recurrence on an impulse: O(L·N), slow but obviously right."""
    x = step.resolve(step.b2)  # (H, N2) B̄ = 2 (2/dt - A)⁻¹ B
    out = []
    for _ in range(length):
        out.append(2 * (c * x).sum(-1).real)  # (H,)
        x = step.step(x, None)
    return torch.stack(out, dim=-1)  # (H, L)


def fft_size(length: int) -> int:
    """A fast FFT length ≥ 2L (powers of 2, 3, 5) so the circular convolution is causal."""
    n = 2 * length
    best = 1 << (n - 1).bit_length()
    for p3 in (1, 3, 9, 27):
        for p5 in (1, 5, 25):
            m = p3 * p5
            size = m * (1 << max(0, math.ceil(math.log2(n / m))))
            if n <= size < best:
                best = size
    return best


def causal_conv(u: torch.Tensor, k_f: torch.Tensor, n_fft: int) -> torch.Tensor:
    """y_t = Σ_{s≤t} K_{t-s} u_s along dim 1. u (B, L, H), k_f = rfft(K, n_fft) laid out (F, H)."""
    length = u.shape[1]
    u_f = torch.fft.rfft(u, n=n_fft, dim=1)  # (B, F, H)
    return torch.fft.irfft(u_f * k_f, n=n_fft, dim=1)[:, :length]  # (B, L, H)


def causal_conv_direct(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The same convolution as a Toeplitz product, real ops only (ONNX). k (H, T), u (B, T, H)."""
    t = u.shape[1]
    idx = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # (T, T) t - s
    toeplitz = k[:, idx.clamp(min=0)] * (idx >= 0).to(k.dtype)  # (H, T, T)
    return torch.einsum("hts,bsh->bth", toeplitz, u)  # (B, T, H)
