"""The AOTInductor step package: the eager step's numbers at every rate and batch size, built
once per fingerprint and loaded from disk afterwards."""

import os

import pytest
import torch

from model.aot_step import AotStep, fingerprint, package_for
from model.fused import StateLayout, inductor_available
from tests.model.conftest import perturbed_network

pytestmark = pytest.mark.skipif(not inductor_available(), reason="needs a C++ compiler")


def _network(layer: str):
    return perturbed_network(layer=layer, task="classification", labels=list("abcde"))


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """One cache directory for the module: a package takes ~25 s to build, so the tests share
    the S4D one (the first test that needs it builds it)."""
    return tmp_path_factory.mktemp("packages")


@pytest.mark.parametrize("layer", ["s4d", "s4"])
def test_package_matches_the_eager_step_at_every_rate(layer, packages):
    net = _network(layer)
    template = net.to_recurrent(1.0)
    layout = StateLayout.of(template.state_spec)
    step = AotStep(template, layout, packages)
    for rate in (1.0, 0.5, 3.0):  # one package, every rate: the tables are inputs
        rec = net.to_recurrent(rate)
        for batch in (1, 5):
            u = torch.randn(batch, 3)
            state = [torch.randn_like(s) * 0.1 for s in rec.initial_state(batch)]
            with torch.no_grad():
                expected_y, expected_state = rec.step(u, state)
                y, flat32, flat64 = step(rec, u, *layout.join(state))
            assert torch.allclose(y, expected_y, atol=1e-5)
            for got, want in zip(layout.split(flat32, flat64), expected_state, strict=True):
                assert torch.allclose(got, want, atol=1e-5)


def test_package_is_built_once_and_named_by_the_weights(packages, monkeypatch):
    net = _network("s4d")
    template = net.to_recurrent(1.0)
    layout = StateLayout.of(template.state_spec)
    path = package_for(template, layout, packages)  # built here, or by the test above
    assert path.parent == packages and path.name.startswith("step-")
    built = path.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("the cached package should have been used")

    monkeypatch.setattr("model.aot_step.build", no_build)
    assert package_for(template, layout, packages) == path
    assert path.stat().st_mtime_ns == built
    before = fingerprint(template, layout, torch.device("cpu"))
    with torch.no_grad():
        net.blocks[0].layer.D.add_(1.0)  # other weights: another package
    assert fingerprint(net.to_recurrent(1.0), layout, torch.device("cpu")) != before


def test_loading_leaves_nothing_in_the_temporary_directory(packages, tmp_path, monkeypatch):
    # torch's loader unpacks each package into $TMPDIR/aotinductor_* and keeps it there
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    net = _network("s4d")
    template = net.to_recurrent(1.0)
    layout = StateLayout.of(template.state_spec)
    step = AotStep(template, layout, packages)
    assert list(tmp_path.iterdir()) == []
    assert os.environ["TMPDIR"] == str(tmp_path)
    rec = net.to_recurrent(0.5)  # the unpacked library is gone, and the loaded one still runs
    u = torch.randn(2, 3)
    state = rec.initial_state(2)
    with torch.no_grad():
        expected_y, _ = rec.step(u, state)
        y, _, _ = step(rec, u, *layout.join(state))
    assert torch.allclose(y, expected_y, atol=1e-5)
