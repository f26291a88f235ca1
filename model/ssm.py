"""S4D and S4 layers: parameters and the convolutional view.

A layer maps (B, L, H) -> (B, L, H): y = K ∗ u + D·u, then GELU, a Linear to 2H and a GLU,
like the official S4Block. Parameters are those of the continuous-time system; `rate` only
rescales dt (a model trained at rate r served at r' uses dt·r/r', i.e. rate = r'/r).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from cachetools import LRUCache
from torch import nn

from model.discretize import DPLRBilinear, discretize
from model.hippo import log_uniform_dt, nplr_legs, s4d_legs, s4d_lin
from model.kernels import (
    causal_conv,
    causal_conv_reused,
    causal_conv_taps,
    fft_size,
    kernel_diag,
    kernel_dplr,
    reused_buffer,
)

# Kernel spectra kept per layer, in bytes: a few lengths of a large layer (H=128 at L=16000 is
# 17 MB), and never one that is larger (it is recomputed instead)
KERNEL_CACHE_BYTES = 128 << 20


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def as_complex(x: torch.Tensor) -> torch.Tensor:
    """A (..., 2) real parameter as complex128."""
    return torch.view_as_complex(x.to(torch.float64).contiguous())


def as_real(x: torch.Tensor) -> torch.Tensor:
    """A complex tensor as (..., 2) float32 for storage."""
    return torch.view_as_real(x.to(torch.complex128)).to(torch.float32).contiguous()


def bandlimit_mask(a: torch.Tensor, dt: torch.Tensor, bandlimit: float) -> torch.Tensor:
    """1 for modes oscillating below bandlimit × Nyquist at the trained rate, else 0 (the S4
    authors' remedy for aliasing when dt grows). a (H, N2), dt (H,) -> (H, N2)."""
    cycles_per_sample = dt[:, None] * a.imag.abs() / (2 * math.pi)  # (H, N2)
    return (cycles_per_sample < 0.5 * bandlimit).to(a.real.dtype)


def widen(u: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., H) -> (..., channels·H), feature c·H + h = u_h: every channel reads its input."""
    return u if channels == 1 else u.repeat(*([1] * (u.dim() - 1)), channels)


class SSMLayer(nn.Module):
    """Shared part of S4D and S4: kernel cache, D skip term and the pointwise output tail.

    `channels` > 1 (the official S4Block's `channels`): each feature has several outputs
    C_c x + D_c u, flattened as c·H + h before the output linear (channels·H -> 2H). They are
    kept as channels·H independent SSM rows fed with the tiled input, which is exact and leaves
    every view unchanged (the state is channels times that of a shared-state layout).
    `bidirectional`: a second, anti-causal kernel from C_back (convolutional view only).
    """

    def __init__(self, d_model: int, d_state: int, dropout: float = 0.0, channels: int = 1,
                 bidirectional: bool = False) -> None:
        super().__init__()
        if d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs), got {d_state}")
        self.d_model, self.channels, self.bidirectional = d_model, channels, bidirectional
        self.h, self.n2 = channels * d_model, d_state // 2  # SSM rows, modes per row
        self.D = nn.Parameter(torch.randn(self.h))  # (H',) H' = channels·H
        self.output_linear = nn.Linear(self.h, 2 * d_model)
        self.dropout = nn.Dropout(dropout)
        self._kernels: LRUCache = LRUCache(KERNEL_CACHE_BYTES, getsizeof=_nbytes)

    # --- to be provided by the subclasses -------------------------------------------------
    def kernel(self, length: int, rate: float = 1.0) -> torch.Tensor:
        """The convolution kernel (H', L) in float64; (2H', L), forward rows then backward
        rows, when bidirectional."""
        raise NotImplementedError

    def recurrence(self, rate: float = 1.0, chunk_max: int = 256) -> nn.Module:
        raise NotImplementedError

    # --- convolutional view ---------------------------------------------------------------
    def dt(self, rate: float) -> torch.Tensor:
        return torch.exp(self.log_dt.to(torch.float64)) / rate  # (H,)

    def _version(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def _taps(self, length: int, rate: float) -> torch.Tensor:
        """The kernel as applied: D·u folded into tap 0 (K * u + D u = (K + D δ) * u, one
        pass less over the (B, L, H) activations), and the backward half (if any) delayed by
        one sample, since its first tap multiplies u_{t+1} (the official layer's convention)."""
        k = self.kernel(length, rate)  # (H' or 2H', L)
        skip = torch.zeros_like(k)
        skip[: self.h, 0] = self.D.to(k.dtype)
        k = k + skip
        if not self.bidirectional:
            return k
        return torch.cat([k[: self.h], F.pad(k[self.h:, :-1], (1, 0))])  # (2H', L)

    def kernel_fft(self, length: int, rate: float) -> tuple[torch.Tensor, int]:
        """rfft of the kernel, cached by (length, rate) until a parameter changes (no graph:
        training convolves with the taps themselves, see `forward`)."""
        n_fft = fft_size(length)
        device = self.D.device
        key = (length, float(rate), str(device), self._version())
        if key in self._kernels:
            return self._kernels[key], n_fft
        # a normal tensor even when made under inference_mode (the server's predict), so an
        # autograd forward in eval mode may read the cached kernel later
        with torch.inference_mode(False), torch.no_grad():
            k = self._taps(length, rate)  # (H', L) float64
            k_f = torch.fft.rfft(k, n=n_fft).to(torch.complex64).to(device)  # (H', F)
        if _nbytes(k_f) <= self._kernels.maxsize:
            self._kernels[key] = k_f
        return k_f, n_fft

    def clear_kernel_cache(self) -> None:
        self._kernels.clear()

    def tail(self, y: torch.Tensor) -> torch.Tensor:
        """GELU -> Linear(H', 2H) -> GLU, applied per time step."""
        y = self.dropout(F.gelu(y))
        return F.glu(self.output_linear(y), dim=-1)

    def forward(self, u: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """u (B, L, H) -> (B, L, H) through the convolutional view."""
        u = widen(u, self.channels)  # (B, L, H')
        if torch.is_grad_enabled() and self.training:  # taps, not spectra: see causal_conv_taps
            taps, n_fft = self._taps(u.shape[1], rate).to(u.dtype), fft_size(u.shape[1])
            y = causal_conv_taps(u, taps[: self.h], n_fft)  # (B, L, H'), D u included
            if self.bidirectional:
                y = y + causal_conv_taps(u.flip(1), taps[self.h:], n_fft).flip(1)
            return self.tail(y)
        k_f, n_fft = self.kernel_fft(u.shape[1], rate)  # (H', F) or (2H', F)
        if self._lean(u):
            return self._inference(u, k_f, n_fft)
        y = causal_conv(u, k_f[: self.h], n_fft)  # (B, L, H'), D u included
        if self.bidirectional:  # y_t += Σ_{s>t} K_back[s-t-1] u_s: causal in reversed time
            y = y + causal_conv(u.flip(1), k_f[self.h:], n_fft).flip(1)
        return self.tail(y)

    def _lean(self, u: torch.Tensor) -> bool:
        """Inference on float32 outside any graph capture: the reused-buffer path applies."""
        return not (torch.is_grad_enabled() or self.training or self.bidirectional
                    or u.dtype != torch.float32 or torch.jit.is_tracing()
                    or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())

    def _inference(self, u: torch.Tensor, k_f: torch.Tensor, n_fft: int) -> torch.Tensor:
        """The same layer without autograd, channels first from the FFT to the Linear: GELU
        in place on the conv's output, and the Linear reads it transposed (a GEMM takes
        strided operands for free) into a kept buffer, so its output is (B, L, 2H), contiguous."""
        y = causal_conv_reused(u, k_f, n_fft)  # (B, H', L), the irfft's output
        torch.ops.aten.gelu_(y)
        linear = self.output_linear
        batch, length = u.shape[:2]
        z = reused_buffer("linear", (batch, length, linear.out_features), u.device)  # (B, L, 2H)
        for b in range(batch):  # one GEMM per sequence: its rows are y[b] read transposed
            torch.addmm(linear.bias, y[b].T, linear.weight.T, out=z[b])
        return F.glu(z, dim=-1)  # (B, L, H), a new tensor

    def _no_recurrence(self) -> None:
        if self.bidirectional:
            raise ValueError("a bidirectional layer reads future samples, so it has no "
                             "recurrent (streaming) form; use the convolutional view (predict)")


class S4DLayer(SSMLayer):
    """Diagonal state space layer (S4D) with ZOH or bilinear discretisation."""

    def __init__(self, d_model: int, d_state: int = 64, init: str = "legs", disc: str = "zoh",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dropout: float = 0.0,
                 bandlimit: float | None = None, channels: int = 1,
                 bidirectional: bool = False) -> None:
        super().__init__(d_model, d_state, dropout, channels, bidirectional)
        self.bandlimit = bandlimit
        if init not in ("legs", "lin"):
            raise ValueError(f"unknown S4D init {init!r}: expected 'legs' or 'lin'")
        self.disc = disc
        lam, b = s4d_legs(self.n2) if init == "legs" else s4d_lin(self.n2)
        lam, b = lam.expand(self.h, -1), b.expand(self.h, -1)  # (H', N2)
        c = torch.randn(self.h, self.n2, dtype=torch.complex128) * 0.5**0.5  # (H', N2)
        self.log_dt = nn.Parameter(log_uniform_dt(self.h, dt_min, dt_max).float())  # (H',)
        self.log_a_real = nn.Parameter(torch.log(-lam.real).float())  # (H', N2) Re A = -exp(.)
        self.a_imag = nn.Parameter(lam.imag.float().clone())  # (H', N2)
        self.B = nn.Parameter(as_real(b))  # (H', N2, 2)
        self.C = nn.Parameter(as_real(c))  # (H', N2, 2)
        if bidirectional:
            c_back = torch.randn(self.h, self.n2, dtype=torch.complex128) * 0.5**0.5
            self.C_back = nn.Parameter(as_real(c_back))  # (H', N2, 2) anti-causal readout

    def continuous(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, C) complex128, each (H, N2)."""
        a = -torch.exp(self.log_a_real.to(torch.float64)) + 1j * self.a_imag.to(torch.float64)
        return a, as_complex(self.B), self._limited(a, as_complex(self.C))

    def _limited(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.bandlimit is None:
            return c
        return c * bandlimit_mask(a, self.dt(1.0), self.bandlimit)

    def discrete(self, rate: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ā, B̄, C) complex128 at this rate."""
        a, b, c = self.continuous()
        da, db = discretize(a, b, self.dt(rate), self.disc)
        return da, db, c

    def kernel(self, length: int, rate: float = 1.0) -> torch.Tensor:
        da, db, c = self.discrete(rate)
        if self.bidirectional:  # same Ā, B̄; the backward rows read out with C_back
            c_back = self._limited(self.continuous()[0], as_complex(self.C_back))
            da, db, c = torch.cat([da, da]), torch.cat([db, db]), torch.cat([c, c_back])
        return kernel_diag(da, db, c, length)

    def recurrence(self, rate: float = 1.0, chunk_max: int = 256) -> nn.Module:
        from model.recurrent import DiagonalRecurrence

        self._no_recurrence()
        da, db, c = self.discrete(rate)
        return DiagonalRecurrence(da, db, c, self, chunk_max)


class S4Layer(SSMLayer):
    """S4: A = Λ - P P* from HiPPO-LegS (diagonal plus low rank), bilinear discretisation."""

    def __init__(self, d_model: int, d_state: int = 64, rank: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dropout: float = 0.0, channels: int = 1) -> None:
        super().__init__(d_model, d_state, dropout, channels)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        lam, p, b = nplr_legs(d_state)  # (N2,) each
        p = torch.cat([p[None], torch.zeros(rank - 1, self.n2, dtype=p.dtype)])  # (R, N2)
        h = self.h  # channels·d_model SSM rows
        c = torch.randn(h, self.n2, dtype=torch.complex128) * 0.5**0.5  # (H', N2)
        self.log_dt = nn.Parameter(log_uniform_dt(h, dt_min, dt_max).float())  # (H',)
        self.log_lam_real = nn.Parameter(torch.log(-lam.real).expand(h, -1).float())
        self.lam_imag = nn.Parameter(lam.imag.expand(h, -1).float().clone())  # (H', N2)
        self.P = nn.Parameter(as_real(p[:, None].expand(-1, h, -1)))  # (R, H', N2, 2)
        self.B = nn.Parameter(as_real(b.expand(h, -1)))  # (H', N2, 2)
        self.C = nn.Parameter(as_real(c))  # (H', N2, 2)

    def continuous(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Λ, P, B, C) complex128: Λ, B, C (H, N2), P (R, H, N2)."""
        lam_re = -torch.exp(self.log_lam_real.to(torch.float64))
        lam = lam_re + 1j * self.lam_imag.to(torch.float64)
        return lam, as_complex(self.P), as_complex(self.B), as_complex(self.C)

    def kernel(self, length: int, rate: float = 1.0) -> torch.Tensor:
        lam, p, b, c = self.continuous()
        return kernel_dplr(lam, p, b, c, self.dt(rate), length)

    def recurrence(self, rate: float = 1.0, chunk_max: int = 256) -> nn.Module:
        from model.recurrent import DPLRRecurrence

        lam, p, b, c = self.continuous()
        return DPLRRecurrence(DPLRBilinear.build(lam, p, b, self.dt(rate)), c, self, chunk_max)
