import torch

from model.hippo import hippo_legs, nplr_legs, s4d_legs, s4d_lin
from model.kernels import conj_extend


def test_legs_matrix_entries():
    a, b = hippo_legs(4)
    assert a[2, 2] == -3 and a[0, 1] == 0  # -(n+1) on the diagonal, zero above it
    assert torch.isclose(a[3, 1], -torch.sqrt(torch.tensor(7.0 * 3.0, dtype=torch.float64)))
    assert torch.allclose(b, torch.sqrt(torch.tensor([1.0, 3, 5, 7], dtype=torch.float64)))


def test_nplr_form_has_the_eigenvalues_of_legs():
    """Λ - P P* (conjugate-extended) is similar to LegS, whose eigenvalues are -1..-N."""
    n = 8
    lam, p, b = nplr_legs(n)
    full = torch.diag(conj_extend(lam)) - torch.outer(conj_extend(p), conj_extend(p).conj())
    eig = torch.linalg.eigvals(full)
    assert torch.allclose(eig.real.sort().values, -torch.arange(n, 0, -1, dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(eig.imag, torch.zeros(n, dtype=torch.float64), atol=1e-6)
    # the basis change is unitary, so B keeps its norm
    assert torch.isclose(conj_extend(b).abs().square().sum(), hippo_legs(n)[1].square().sum())


def test_s4d_initialisations_are_stable_and_paired():
    for lam, _ in (s4d_lin(16), s4d_legs(16)):
        assert lam.shape == (16,)
        assert (lam.real < 0).all()
        assert (lam.imag >= 0).all()  # one member of each conjugate pair
