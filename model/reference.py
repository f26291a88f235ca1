"""An independent float64 reference: dense conjugate-extended recurrences, one sample at a time.

It shares no code path with the kernels, the Woodbury step or the chunk tables: A is formed as
a dense N×N matrix and discretised with dense solves, so agreement with the fast views is a
real check. O(L·N²) — for tests and the benchmark's accuracy report only.
"""

from __future__ import annotations

import torch

from model.kernels import conj_extend
from model.network import S4Network
from model.ssm import S4DLayer, S4Layer, SSMLayer, widen


def dense_system(layer: SSMLayer, rate: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ā (H, N, N), B̄ (H, N), C (H, N)) in complex128 over the conjugate-extended state."""
    dt = torch.exp(layer.log_dt.detach().double()) / rate  # (H,)
    if isinstance(layer, S4Layer):
        lam, p, b, c = (x.detach() for x in layer.continuous())
        lam_e, p_e = conj_extend(lam), conj_extend(p)  # (H, N), (R, H, N)
        a = torch.diag_embed(lam_e) - torch.einsum("rhi,rhj->hij", p_e, p_e.conj())
        method = "bilinear"
    elif isinstance(layer, S4DLayer):
        a, b, c = (x.detach() for x in layer.continuous())
        a = torch.diag_embed(conj_extend(a))  # (H, N, N)
        method = layer.disc
    else:
        raise TypeError(f"no dense reference for {type(layer).__name__}")
    b_e, c_e = conj_extend(b), conj_extend(c)  # (H, N)
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    dta = dt[:, None, None] * a  # (H, N, N)
    if method == "zoh":  # diagonal: exp and (exp - 1)/A elementwise on the diagonal
        diag = torch.diagonal(dta, dim1=-2, dim2=-1)  # (H, N)
        da = torch.diag_embed(torch.exp(diag))
        db = (torch.exp(diag) - 1) / torch.diagonal(a, dim1=-2, dim2=-1) * b_e
    else:
        left = eye - dta / 2
        da = torch.linalg.solve(left, eye + dta / 2)
        db = torch.linalg.solve(left, dt[:, None] * b_e)
    return da, db, c_e


def ssm_reference(layer: SSMLayer, u: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
    """The layer's linear SSM part, y = C x + D u, by a float64 loop. u (B, L, H) -> (B, L, H')
    (H' = channels·H)."""
    if layer.bidirectional:
        raise TypeError("the dense reference is causal; bidirectional layers have none")
    da, db, c = dense_system(layer, rate)
    u = widen(u.double(), layer.channels)
    x = torch.zeros(u.shape[0], *db.shape, dtype=torch.complex128)  # (B, H, N)
    ys = []
    for t in range(u.shape[1]):
        x = torch.einsum("hij,bhj->bhi", da, x) + db * u[:, t, :, None]
        ys.append((c * x).sum(-1).real)  # (B, H)
    return torch.stack(ys, dim=1) + u * layer.D.detach().double()  # (B, L, H)


@torch.no_grad()
def reference_outputs(net: S4Network, u: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
    """The whole network in float64 with the dense reference SSM: (B, L, d_in) -> (B, L, d_out)."""
    net64 = S4Network(net.config)
    net64.load_state_dict(net.state_dict())
    net64 = net64.double().eval()
    x = net64.encoder(u.double())
    for block in net64.blocks:
        layer = block.layer
        x = block.around(x, lambda z, layer=layer: layer.tail(ssm_reference(layer, z, rate)))
    return net64.head(x)
