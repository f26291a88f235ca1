"""HiPPO-LegS and the initialisations of S4 (DPLR) and S4D (diagonal) state matrices.

All matrices are built in float64 / complex128; layers cast what they store.
Conjugate pairs: a real N-state system has eigenvalues in conjugate pairs, so only the
N/2 modes with positive imaginary part are kept; the other half is implied.
"""

from __future__ import annotations

import math

import torch


def hippo_legs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The HiPPO-LegS matrices (A, B) of the LSSL/S4 papers, with A stable (negative)."""
    q = torch.sqrt(2 * torch.arange(n, dtype=torch.float64) + 1)  # (N,)
    a = -torch.tril(q[:, None] * q[None, :], diagonal=-1)  # (N, N) strictly lower part
    a = a - torch.diag(torch.arange(n, dtype=torch.float64) + 1)  # (N, N) diagonal -(n+1)
    return a, q.clone()  # (N, N), (N,)


def nplr_legs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LegS in DPLR form A = V (Λ - P P*) V*, returning the kept half (Λ, P, B) in the V basis.

    A + P Pᵀ with P_n = sqrt(n + 1/2) is -1/2 I plus a skew-symmetric matrix, hence normal and
    unitarily diagonalisable: a Hermitian eigensolve, never the ill-conditioned eig of A itself.
    """
    if n % 2:
        raise ValueError(f"d_state must be even (conjugate pairs), got {n}")
    a, b = hippo_legs(n)
    p = torch.sqrt(torch.arange(n, dtype=torch.float64) + 0.5)  # (N,)
    skew = a + p[:, None] * p[None, :] + 0.5 * torch.eye(n, dtype=torch.float64)  # (N, N)
    w, v = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # eigenvalues of skew are i·w
    keep = w > 0  # one member of each conjugate pair
    v = v[:, keep]  # (N, N/2); the other half of the basis is conj(v)
    lam = -0.5 + 1j * w[keep]  # (N/2,)
    p_t = v.conj().T @ p.to(torch.complex128)  # (N/2,)
    b_t = v.conj().T @ b.to(torch.complex128)  # (N/2,)
    return lam, p_t, b_t


def s4d_lin(n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S4D-Lin: A_n = -1/2 + iπn, B_n = 1 (the S4D paper's simplest initialisation)."""
    k = torch.arange(n2, dtype=torch.float64)
    lam = -0.5 + 1j * math.pi * k  # (N/2,)
    return lam, torch.ones(n2, dtype=torch.complex128)


def s4d_legs(n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S4D-LegS: the diagonal part Λ of LegS's DPLR form, with its B (the low rank term dropped)."""
    lam, _, b = nplr_legs(2 * n2)
    return lam, b


def log_uniform_dt(h: int, dt_min: float, dt_max: float, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """log dt per channel, uniform in [log dt_min, log dt_max]."""
    r = torch.rand(h, dtype=torch.float64, generator=generator)
    return math.log(dt_min) + r * (math.log(dt_max) - math.log(dt_min))  # (H,)
