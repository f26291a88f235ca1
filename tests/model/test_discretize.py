import torch

from model.discretize import DPLRBilinear, discretize_bilinear, discretize_zoh, inner
from model.hippo import nplr_legs
from model.kernels import conj_extend, dplr_transition


def test_zoh_is_the_exact_solution_for_constant_input():
    a = torch.tensor([[-0.5 + 3j]], dtype=torch.complex128)
    b = torch.tensor([[1.0 + 0j]], dtype=torch.complex128)
    dt = torch.tensor([0.1], dtype=torch.float64)
    da, db = discretize_zoh(a, b, dt)
    # x' = a x + b with x(0) = 0 has x(dt) = (e^{a dt} - 1)/a · b
    assert torch.allclose(db, (torch.exp(a * 0.1) - 1) / a * b)
    assert torch.allclose(da, torch.exp(a * 0.1))


def test_bilinear_matches_its_definition_and_tends_to_zoh():
    a = torch.tensor([[-1.0 + 2j]], dtype=torch.complex128)
    b = torch.ones(1, 1, dtype=torch.complex128)
    dt = torch.tensor([1e-3], dtype=torch.float64)
    da, db = discretize_bilinear(a, b, dt)
    assert torch.allclose(da, (1 + a * 5e-4) / (1 - a * 5e-4))
    dz, bz = discretize_zoh(a, b, dt)
    assert (da - dz).abs().max() < 1e-9 and (db - bz).abs().max() < 1e-9


def test_woodbury_step_equals_dense_bilinear_step():
    h, n2 = 3, 8
    lam, p, b = nplr_legs(2 * n2)
    lam, b, p = lam.expand(h, n2), b.expand(h, n2), p.expand(1, h, n2)
    dt = torch.tensor([0.01, 0.1, 0.5], dtype=torch.float64)
    terms = DPLRBilinear.build(lam, p, b, dt)
    x = torch.randn(2, h, n2, dtype=torch.complex128)
    u = torch.randn(2, h, dtype=torch.float64)
    dense = dplr_transition(lam, p, dt)  # (H, N, N)
    a_full = torch.diag_embed(conj_extend(lam)) - torch.einsum(
        "rhi,rhj->hij", conj_extend(p), conj_extend(p).conj())
    eye = torch.eye(2 * n2, dtype=torch.complex128)
    b_bar = torch.linalg.solve(eye - dt[:, None, None] / 2 * a_full, dt[:, None] * conj_extend(b))
    expected = torch.einsum("hij,bhj->bhi", dense, conj_extend(x)) + b_bar * u[..., None]
    assert torch.allclose(terms.step(x, u), expected[..., :n2], atol=1e-12)


def test_inner_is_the_full_state_product():
    p = torch.randn(2, 3, 4, dtype=torch.complex128)
    x = torch.randn(5, 3, 4, dtype=torch.complex128)
    full = torch.einsum("rhn,bhn->bhr", conj_extend(p).conj(), conj_extend(x))
    assert torch.allclose(inner(p, x), full.real) and full.imag.abs().max() < 1e-12
