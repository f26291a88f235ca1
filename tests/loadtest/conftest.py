"""Servers for the load tester's tests: the echo app and a real s4serve, as child processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loadtest.config import StreamLoadConfig
from loadtest.processes import ServerProcess
from loadtest.stream_load import StreamResult, run_loop, run_stream_load
from model.checkpoint import save_model
from model.config import ModelConfig
from model.network import S4Network


@pytest.fixture(scope="session")
def echo_url() -> Iterator[str]:
    with ServerProcess.echo() as srv:
        yield srv.url


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A small classifier shaped like the motion model (3 channels in, 4 classes out)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="tiny", task="classification", layer="s4d", d_input=3, d_output=4, d_model=16,
        n_layers=2, d_state=16, labels=["a", "b", "c", "d"], sample_rate=100.0,
    )  # fmt: skip
    net = S4Network(cfg).eval()
    with torch.no_grad():  # move parameters off their initialisation, as training would
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_model(net, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def server_url(small_model_dir: Path) -> Iterator[str]:
    with ServerProcess.s4serve([small_model_dir]) as srv:
        yield srv.url


def quick_stream(url: str, model: str = "echo", **overrides) -> StreamResult:
    """A short, small run (about a second) of the streaming load test."""
    fields = dict(url=url, model=model, sessions=4, rate=200.0, frame=1, ramp_s=0.2,
                  hold_s=0.6, drain_s=3.0, verify_sessions=2)  # fmt: skip
    fields.update(overrides)
    return run_loop(run_stream_load(StreamLoadConfig(**fields)))
