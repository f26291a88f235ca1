"""Discretisation of continuous-time diagonal and DPLR systems with step dt.

Diagonal A (S4D): ZOH or bilinear, elementwise. DPLR A = Λ - P P* (S4): bilinear only,
applied in the Woodbury form so that no N×N matrix is ever formed.
All vectors hold the kept half of conjugate pairs; inner products over the full state of a
conjugate-symmetric vector are therefore 2·Re of the half-sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def discretize_zoh(a: torch.Tensor, b: torch.Tensor, dt: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ā = exp(dt·A), B̄ = (exp(dt·A) - 1)/A · B, for diagonal A (H, N2) and dt (H,)."""
    dta = dt[:, None] * a  # (H, N2)
    da = torch.exp(dta)  # (H, N2)
    return da, (da - 1) / a * b  # (H, N2), (H, N2)


def discretize_bilinear(a: torch.Tensor, b: torch.Tensor, dt: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ā = (1 + dt·A/2)/(1 - dt·A/2), B̄ = dt·B/(1 - dt·A/2), for diagonal A."""
    half = dt[:, None] * a / 2  # (H, N2)
    return (1 + half) / (1 - half), dt[:, None] * b / (1 - half)  # (H, N2), (H, N2)


def discretize(a: torch.Tensor, b: torch.Tensor, dt: torch.Tensor, method: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "zoh":
        return discretize_zoh(a, b, dt)
    if method == "bilinear":
        return discretize_bilinear(a, b, dt)
    raise ValueError(f"unknown discretisation {method!r}: expected 'zoh' or 'bilinear'")


def inner(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p* x over the conjugate-extended state: 2·Re(Σ_n conj(p_n) x_n), real.

    p (R, H, N2), x (..., H, N2) -> (..., H, R)
    """
    return 2 * torch.einsum("rhn,...hn->...hr", p.conj(), x).real


@dataclass
class DPLRBilinear:
    """Bilinear step terms of A = Λ - P P*:  x' = (2/dt - A)⁻¹ [(2/dt + A) x + 2 B u].

    (2/dt - A)⁻¹ = D - D P (I + P* D P)⁻¹ P* D with D = diag(1/(2/dt - Λ)) (Woodbury).
    """

    a0: torch.Tensor  # (H, N2) 2/dt + Λ
    p: torch.Tensor  # (R, H, N2)
    b2: torch.Tensor  # (H, N2) 2·B
    d: torch.Tensor  # (H, N2) 1/(2/dt - Λ)
    core: torch.Tensor  # (H, R, R) real, (I + P* D P)⁻¹
    lam: torch.Tensor  # (H, N2) Λ, kept for dense set-up work
    dt: torch.Tensor  # (H,)

    @classmethod
    def build(cls, lam: torch.Tensor, p: torch.Tensor, b: torch.Tensor, dt: torch.Tensor
              ) -> DPLRBilinear:
        two_dt = (2 / dt)[:, None]  # (H, 1)
        d = 1 / (two_dt - lam)  # (H, N2)
        gram = 2 * torch.einsum("ihn,hn,jhn->hij", p.conj(), d, p).real  # (H, R, R)
        eye = torch.eye(p.shape[0], dtype=gram.dtype)
        return cls(two_dt + lam, p, 2 * b, d, torch.linalg.inv(eye + gram), lam, dt)

    def resolve(self, v: torch.Tensor) -> torch.Tensor:
        """(2/dt - A)⁻¹ v for conjugate-symmetric v (..., H, N2)."""
        w = self.d * v  # (..., H, N2)
        q = torch.einsum("hij,...hj->...hi", self.core, inner(self.p, w))  # (..., H, R)
        return w - self.d * torch.einsum("rhn,...hr->...hn", self.p, q.to(w.dtype))

    def step(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """One step x -> Ā x + B̄ u, complex state x (..., H, N2), real input u (..., H)."""
        v = self.a0 * x - torch.einsum("rhn,...hr->...hn", self.p, inner(self.p, x).to(x.dtype))
        if u is not None:
            v = v + self.b2 * u[..., None]
        return self.resolve(v)
