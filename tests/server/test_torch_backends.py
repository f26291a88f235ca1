"""The torch backend's step compilers give the same numbers as the eager recurrence."""

import torch

from model.checkpoint import save_model
from server.backends import load_backend
from tests.model.conftest import perturbed_network


def test_torchscript_and_inductor_backends_match_eager(tmp_path):
    net = perturbed_network(layer="s4", task="classification", labels=list("abcde"))
    save_model(net, tmp_path / "m")
    rec = net.to_recurrent(rate=2.0)
    u = torch.randn(4, 3)
    expected, expected_state = rec.step(u, rec.initial_state(4))
    for kind in ("torch", "torch-inductor"):
        backend = load_backend(kind, tmp_path / "m", "cpu")
        assert backend.info.backend == "torch"
        state = [torch.zeros(4, *s.shape, dtype=getattr(torch, s.dtype))
                 for s in backend.state_spec]
        y, new_state = backend.step(u, state, 2.0)
        assert torch.allclose(y, expected, atol=1e-5)
        for a, b in zip(new_state, expected_state, strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_every_step_compiler_serves_the_eager_numbers_on_flat_rows(tmp_path):
    net = perturbed_network(layer="s4d", task="classification", labels=list("abcde"))
    save_model(net, tmp_path / "m")
    rec = net.to_recurrent(rate=0.5)
    u = torch.randn(3, 3)
    state = [torch.randn_like(s) * 0.1 for s in rec.initial_state(3)]
    expected, expected_state = rec.step(u, state)
    for compiler in ("native", "aoti", "inductor", "torchscript"):
        backend = load_backend("torch", tmp_path / "m", "cpu", step_compiler=compiler,
                               compile_cache=tmp_path / "cache")
        backend.warmup()
        assert backend.step_compiler == compiler
        y, flat32, flat64 = backend.step_flat(u, *backend.layout.join(state), 0.5)
        assert torch.allclose(y, expected, atol=1e-5)
        for got, want in zip(backend.layout.split(flat32, flat64), expected_state, strict=True):
            assert torch.allclose(got, want, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("*.pt2"))) == 1


def test_step_rows_into_steps_the_rows_where_they_lie(tmp_path):
    """The served in-place step writes outputs into strided records: the eager recurrence's
    numbers for the rows it names; a NaN input row is not kept and left as it was; the
    other rows of the pool are untouched."""
    import numpy as np

    net = perturbed_network(layer="s4d", task="classification", labels=list("abcde"))
    save_model(net, tmp_path / "m")
    backend = load_backend("torch", tmp_path / "m", "cpu", step_compiler="native",
                           compile_cache=tmp_path / "cache")
    backend.warmup()
    assert backend.rows_in_place
    rec = net.to_recurrent(rate=1.0)
    rows = np.array([4, 1, 6], np.int64)
    u = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    u[2, 1] = np.nan
    pool32, pool64 = backend.layout.join(backend.initial_state(8))
    pool32 += 0.01
    before32, before64 = pool32.clone(), pool64.clone()
    expected, state = rec.step(torch.from_numpy(u[:2]),
                               backend.layout.split(pool32[rows[:2]], pool64[rows[:2]]))
    want32, want64 = backend.layout.join(state)
    records = np.zeros(3, [("id", "<u4"), ("y", "<f4", (5,))])
    flags = np.zeros(3, np.uint8)
    done = backend.step_rows_into(u, pool32, pool64, rows, 1.0, records["y"], flags)
    assert done == 2 and flags.tolist() == [1, 1, 0]
    assert np.allclose(records["y"][:2], expected.numpy(), atol=1e-5)
    assert torch.allclose(pool32[rows[:2]], want32, atol=1e-5)
    assert torch.allclose(pool64[rows[:2]], want64, atol=1e-5)
    others = [0, 2, 3, 5, 6, 7]  # row 6 had the NaN input
    assert torch.equal(pool32[others], before32[others])
    assert torch.equal(pool64[others], before64[others])
