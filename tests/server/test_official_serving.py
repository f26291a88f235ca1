"""Checkpoints written by the official state-spaces/s4 code, imported with `s4serve import
official` and served over real sockets: predict and streams reproduce the official float64
outputs; a bidirectional block serves predict and refuses streams and state with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client import Client, ClientError, StreamError
from server.cli import app
from tests.server.conftest import ServerThread, make_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official-s4"
CASES = ("s4d_channels3", "s4_dplr_channels2", "s4d_bidirectional", "s4d_softplus_lmax")
TOL = 1e-4


def case_data(case: str) -> tuple[np.ndarray, np.ndarray]:
    u = torch.load(FIXTURES / case / "inputs.pt", weights_only=True)["u"]
    ref = torch.load(FIXTURES / case / "expected.pt", weights_only=True)["y_ref64"]
    return u.numpy(), ref.numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    dirs = {}
    for case in CASES:
        result = CliRunner().invoke(app, [
            "import", "official", "--config", str(FIXTURES / case / "config.json"),
            "--weights", str(FIXTURES / case / "state_dict.pt"), "--out", str(root / case),
            "--name", case])
        assert result.exit_code == 0, result.output
        dirs[case] = root / case
    settings = make_settings(dirs, root, max_sessions=16)
    with ServerThread(settings) as running:
        yield running


@pytest.mark.parametrize("case", CASES)
def test_predict_reproduces_the_official_float64_outputs(served, case):
    u, ref = case_data(case)
    with Client(served.url) as c:
        got = c.predict(case, u).outputs
    assert np.abs(got - ref).max() < TOL


@pytest.mark.parametrize("case", ["s4d_channels3", "s4_dplr_channels2", "s4d_softplus_lmax"])
def test_stream_reproduces_the_official_float64_outputs(served, case):
    u, ref = case_data(case)
    sizes = [1, 7, 64, 1, 300, 2, 137]  # ragged frames: step and chunk paths mixed
    with Client(served.url) as c:
        assert c.model(case)["streamable"] is True
        with c.stream(case) as s:
            got, start = [], 0
            for size in sizes:
                got.append(s.send(u[0, start:start + size]))
                start += size
    assert np.abs(np.concatenate(got) - ref[0, :start]).max() < TOL


def test_bidirectional_model_refuses_streams_and_state(served):
    u, _ = case_data("s4d_bidirectional")
    with Client(served.url) as c:
        info = c.model("s4d_bidirectional")
        assert info["streamable"] is False and info["state_bytes"] == 0
        with pytest.raises(StreamError) as err, c.stream("s4d_bidirectional",
                                                         reconnect=False) as s:
            s.send(u[0, :4])
        assert err.value.code == "not_streamable"
        assert "bidirectional" in str(err.value)
        with pytest.raises(ClientError) as failed:
            c.predict("s4d_bidirectional", u, return_state=True)
        assert (failed.value.status, failed.value.code) == (400, "not_streamable")
        # the failures changed nothing: the other models and predict still serve
        assert c.predict("s4d_bidirectional", u[:1, :32]).outputs.shape == (1, 32, 12)
