"""Recurrent views of one layer: a per-sample step and a chunked block form.

The state of each layer is a pair of float32 tensors (real, imaginary), each (B, H, N2), so
that the step uses real arithmetic only and exports to ONNX with a dynamic batch.

Chunk form, for a block of T samples starting from state x (all tables precomputed once, in
float64, for t < chunk_max):
    y_t  = Σ_{s≤t} K_{t-s} u_s                      input -> output  (causal convolution)
         + Σ_n Ye[t,n]·Re x_n + Yi[t,n]·Im x_n       state -> output (responses to e_n, i·e_n)
         + D u_t
    x_T  = Ā^T x + Σ_s Ā^{T-1-s} B̄ u_s                state -> state, input -> state
Cost O(T·N) per channel plus, for S4, O(N²) per power-of-two piece of T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.discretize import DPLRBilinear
from model.kernels import causal_conv_direct, conj_extend, dplr_transition
from model.ssm import widen

DIRECT_CONV_MAX = 64


def _capturing_graph() -> bool:
    """True while a graph is being traced or exported (TorchScript, ONNX, torch.export)."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting())


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_n a·b over the last axis; one fused kernel, or Mul + ReduceSum for ONNX."""
    if _capturing_graph():
        return (a * b).sum(-1)
    return torch.linalg.vecdot(a, b)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous()


class LayerRecurrence(nn.Module):
    """Tables and pointwise tail shared by the diagonal and DPLR recurrences."""

    def __init__(self, layer: nn.Module, kernel: torch.Tensor, resp: torch.Tensor,
                 inject: torch.Tensor, chunk_max: int) -> None:
        super().__init__()
        self.h, self.n2, self.chunk_max = layer.h, layer.n2, chunk_max
        self.channels = layer.channels  # > 1: each SSM row reads its feature's input
        self.output_linear = layer.output_linear  # shared with the conv view
        self.register_buffer("skip", _f32(layer.D))  # (H,)
        self.register_buffer("k", _f32(kernel))  # (H, Tm) impulse response
        self.register_buffer("resp_re", _f32(resp.real))  # (Tm, H, N2) response to e_n
        self.register_buffer("resp_im", _f32(resp.imag))  # (Tm, H, N2) response to i·e_n
        self.register_buffer("inj_re", _f32(inject.real))  # (Tm, H, N2) Ā^j B̄
        self.register_buffer("inj_im", _f32(inject.imag))

    def tail(self, y: torch.Tensor) -> torch.Tensor:
        return F.glu(self.output_linear(F.gelu(y)), dim=-1)

    # --- subclass hooks -------------------------------------------------------------------
    def ssm_step(self, u: torch.Tensor, xr: torch.Tensor, xi: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def transition(self, xr: torch.Tensor, xi: torch.Tensor, t: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ā^t x for a piece length t from `pieces`."""
        raise NotImplementedError

    def pieces(self, t: int) -> list[int]:
        """Split t ≤ chunk_max into piece lengths the transition tables support."""
        raise NotImplementedError

    # --- views ----------------------------------------------------------------------------
    def step(self, u: torch.Tensor, xr: torch.Tensor, xi: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B, H) -> y (B, H) and the new state, O(N) per channel."""
        y, xr, xi = self.ssm_step(widen(u, self.channels), xr, xi)
        return self.tail(y), xr, xi

    def _piece(self, u: torch.Tensor, xr: torch.Tensor, xi: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = u.shape[1]
        k = self.k[:, :t]  # (H, T)
        if t <= DIRECT_CONV_MAX or _capturing_graph():  # graphs: real ops only, no FFT
            y = causal_conv_direct(u, k)  # (B, T, H)
        else:
            n = 2 * t
            y = torch.fft.irfft(torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(k, n=n).T,
                                n=n, dim=1)[:, :t]  # (B, T, H)
        y = y + torch.einsum("bhn,thn->bth", xr, self.resp_re[:t])
        y = y + torch.einsum("bhn,thn->bth", xi, self.resp_im[:t]) + u * self.skip
        inj_re = self.inj_re[:t].flip(0)  # (T, H, N2) Ā^{T-1-s} B̄
        inj_im = self.inj_im[:t].flip(0)
        xr, xi = self.transition(xr, xi, t)
        xr = xr + torch.einsum("bth,thn->bhn", u, inj_re)
        xi = xi + torch.einsum("bth,thn->bhn", u, inj_im)
        return y, xr, xi

    def chunk(self, u: torch.Tensor, xr: torch.Tensor, xi: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B, T, H) -> y (B, T, H) and the state after the block; vectorised over T."""
        u = widen(u, self.channels)  # (B, T, H')
        outs = []
        start = 0
        while start < u.shape[1]:
            block = min(self.chunk_max, u.shape[1] - start)
            for t in self.pieces(block):
                y, xr, xi = self._piece(u[:, start:start + t], xr, xi)
                outs.append(y)
                start += t
        return self.tail(torch.cat(outs, dim=1)), xr, xi


class DiagonalRecurrence(LayerRecurrence):
    """S4D: Ā diagonal, so Ā^t is elementwise and any block length is one piece."""

    def __init__(self, da: torch.Tensor, db: torch.Tensor, c: torch.Tensor, layer: nn.Module,
                 chunk_max: int = 256) -> None:
        t = torch.arange(chunk_max + 1, dtype=torch.float64)[:, None, None]  # (Tm+1, 1, 1)
        powers = torch.exp(t * torch.log(da))  # (Tm+1, H, N2) Ā^t
        c2 = 2 * c  # (H, N2) conjugate pair folded in
        inject = powers[:-1] * db  # (Tm, H, N2)
        kernel = (c2 * inject).sum(-1).real.T  # (H, Tm)
        out_rows = c2 * powers[1:]  # (Tm, H, N2) y_t = Re Σ c2 Ā^{t+1} x
        resp = torch.complex(out_rows.real, -out_rows.imag)
        super().__init__(layer, kernel, resp, inject, chunk_max)
        for name, value in (("da", da), ("db", db), ("c2", c2)):
            self.register_buffer(f"{name}_re", _f32(value.real))  # (H, N2)
            self.register_buffer(f"{name}_im", _f32(value.imag))
        for name, value in (("da", da), ("c2", c2)):  # addcmul_ takes no sign
            self.register_buffer(f"neg_{name}_im", _f32(-value.imag))
        self.register_buffer("pow_re", _f32(powers.real))  # (Tm+1, H, N2)
        self.register_buffer("pow_im", _f32(powers.imag))
        # float64 Ā, B̄, 2C for the native step's blocks (model/native_step.c), which keep the
        # state in float64 within a block; plain attributes, not buffers: no graph reads them
        self.wide = {name: value.detach().to(torch.complex128).cpu()
                     for name, value in (("da", da), ("db", db), ("c2", c2))}

    def ssm_step(self, u, xr, xi):
        # In-place multiply-adds: at large batch the step is memory bound, so every pass over
        # the (B, H, N2) state counts.
        u_ = u[..., None]  # (B, H, 1)
        nr = torch.mul(xr, self.da_re)  # (B, H, N2) Re(Ā x + B̄ u)
        nr.addcmul_(xi, self.neg_da_im).addcmul_(u_, self.db_re)
        ni = torch.mul(xi, self.da_re)  # (B, H, N2) Im(Ā x + B̄ u)
        ni.addcmul_(xr, self.da_im).addcmul_(u_, self.db_im)
        y = _dot(nr, self.c2_re) + _dot(ni, self.neg_c2_im)
        return y + self.skip * u, nr, ni  # (B, H)

    def transition(self, xr, xi, t):
        pr, pi = self.pow_re[t], self.pow_im[t]  # (H, N2)
        return pr * xr - pi * xi, pr * xi + pi * xr

    def pieces(self, t: int) -> list[int]:
        return [t]


class DPLRRecurrence(LayerRecurrence):
    """S4: the bilinear DPLR step in Woodbury form, O(N·rank) per sample, real arithmetic."""

    def __init__(self, terms: DPLRBilinear, c: torch.Tensor, layer: nn.Module,
                 chunk_max: int = 256) -> None:
        if chunk_max & (chunk_max - 1):
            raise ValueError(f"chunk_max must be a power of two for S4, got {chunk_max}")
        n2 = c.shape[-1]
        c2 = 2 * c
        # Tables from dense powers of Ā in float64 (setup only; the step never forms Ā):
        # doubling blocks, [t, 2t) = [0, t) advanced by Ā^t, so O(log Tm) batched matmuls.
        dense = dplr_transition(terms.lam, terms.p, terms.dt)  # (H, N, N) extended state
        rows = conj_extend(c)[:, None, :] @ dense  # (H, 1, N): c Ā^{t+1} for t = 0
        cols = conj_extend(terms.resolve(terms.b2))[:, :, None]  # (H, N, 1): Ā^0 B̄
        power, trans, t = dense, {}, 1
        while True:
            trans[t] = power[:, :n2]  # (H, N2, N) half of Ā^t: x_t = M [x; conj x]
            if t >= chunk_max:
                break
            rows = torch.cat([rows, rows @ power], dim=1)  # (H, 2t, N)
            cols = torch.cat([cols, power @ cols], dim=2)  # (H, N, 2t)
            power, t = power @ power, 2 * t
        rows, inject_t = rows[:, :chunk_max], cols[:, :n2, :chunk_max].permute(2, 0, 1)
        # y_t = Re(r_t [x; conj x]) = Re x·Re(r + r') + Im x·Re(i r - i r'), r' the conj half
        resp = torch.complex((rows[..., :n2] + rows[..., n2:]).real,
                             (1j * (rows[..., :n2] - rows[..., n2:])).real).transpose(0, 1)
        kernel = (c2 * inject_t).sum(-1).real.T  # (H, Tm)
        for t, m in trans.items():  # columns for Re x and Im x: M11 + M12 and i(M11 - M12)
            trans[t] = torch.cat([m[..., :n2] + m[..., n2:], 1j * (m[..., :n2] - m[..., n2:])],
                                 dim=-1)  # (H, N2, 2·N2)
        super().__init__(layer, kernel, resp, inject_t, chunk_max)
        self.powers = sorted(trans, reverse=True)
        for t, m in trans.items():
            self.register_buffer(f"trans_re_{t}", _f32(m.real))  # (H, N2, 2·N2)
            self.register_buffer(f"trans_im_{t}", _f32(m.imag))
        for name, value in (("a0", terms.a0), ("b2", terms.b2), ("d", terms.d), ("c2", c2),
                            ("p", terms.p), ("dp", terms.d * terms.p)):
            self.register_buffer(f"{name}_re", _f32(value.real))
            self.register_buffer(f"{name}_im", _f32(value.imag))
        for name, value in (("a0", terms.a0), ("d", terms.d), ("c2", c2)):
            self.register_buffer(f"neg_{name}_im", _f32(-value.imag))
        self.register_buffer("core", _f32(terms.core))  # (H, R, R)

    def _inner(self, xr: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """p* x = 2·Re Σ conj(p) x -> (B, H, R)."""
        return 2 * (torch.einsum("rhn,bhn->bhr", self.p_re, xr)
                    + torch.einsum("rhn,bhn->bhr", self.p_im, xi))

    def ssm_step(self, u, xr, xi):
        s = self._inner(xr, xi)  # (B, H, R) P* x
        u_ = u[..., None]  # (B, H, 1)
        vr = torch.mul(xr, self.a0_re)  # (B, H, N2) (2/dt + A) x + 2 B u
        vr.addcmul_(xi, self.neg_a0_im).addcmul_(u_, self.b2_re)
        vr.sub_(torch.einsum("rhn,bhr->bhn", self.p_re, s))
        vi = torch.mul(xi, self.a0_re)
        vi.addcmul_(xr, self.a0_im).addcmul_(u_, self.b2_im)
        vi.sub_(torch.einsum("rhn,bhr->bhn", self.p_im, s))
        wr = torch.mul(vr, self.d_re).addcmul_(vi, self.neg_d_im)  # (B, H, N2) D v
        wi = torch.mul(vi, self.d_re).addcmul_(vr, self.d_im)
        q = torch.einsum("hij,bhj->bhi", self.core, self._inner(wr, wi))  # (B, H, R)
        wr.sub_(torch.einsum("rhn,bhr->bhn", self.dp_re, q))  # x' = D v - D P core P* D v
        wi.sub_(torch.einsum("rhn,bhr->bhn", self.dp_im, q))
        y = _dot(wr, self.c2_re) + _dot(wi, self.neg_c2_im)
        return y + self.skip * u, wr, wi  # (B, H)

    def transition(self, xr, xi, t):
        m_re, m_im = getattr(self, f"trans_re_{t}"), getattr(self, f"trans_im_{t}")
        x = torch.cat([xr, xi], dim=-1)  # (B, H, 2·N2): Re x and Im x as real coordinates
        return torch.einsum("hmn,bhn->bhm", m_re, x), torch.einsum("hmn,bhn->bhm", m_im, x)

    def pieces(self, t: int) -> list[int]:
        return [p for p in self.powers if t & p]
