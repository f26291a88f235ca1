"""The fixed command line of `s4serve import official` and `s4serve export onnx`."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model.checkpoint import load_model
from server.cli import app

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official-s4"


def test_import_official_then_export_onnx(tmp_path):
    case = FIXTURES / "s4d_block"
    runner = CliRunner()
    result = runner.invoke(app, ["import", "official", "--config", str(case / "config.json"),
                                 "--weights", str(case / "state_dict.pt"),
                                 "--out", str(tmp_path / "m"), "--name", "block"])
    assert result.exit_code == 0, result.output
    net = load_model(tmp_path / "m")
    assert net.config.name == "block" and net.config.task == "sequence"
    assert net.config.d_input == net.config.d_output == 16
    u = torch.load(case / "inputs.pt", weights_only=True)["u"][:, :256]
    ref = torch.load(case / "expected.pt", weights_only=True)["y_ref64"][:, :256]
    with torch.no_grad():
        assert (net(u).double() - ref).abs().max() < 1e-4

    result = runner.invoke(app, ["export", "onnx", str(tmp_path / "m"), "--out",
                                 str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "step.onnx").is_file()


def test_import_rejects_bidirectional_with_clear_message(tmp_path):
    case = FIXTURES / "s4d_block"
    meta = json.loads((case / "config.json").read_text())
    meta["constructor_kwargs"]["bidirectional"] = True
    (tmp_path / "c.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(app, ["import", "official", "--config", str(tmp_path / "c.json"),
                                      "--weights", str(case / "state_dict.pt"),
                                      "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "bidirectional" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args", [
    ["export", "onnx", "{tmp}", "--out", "{tmp}/out"],  # not a model directory
    ["evaluate", "{tmp}"],
    ["import", "official", "--config", "{tmp}/config.json", "--weights", "{tmp}/w.pt",
     "--out", "{tmp}/m"],  # a config that is not JSON
])
def test_a_users_mistake_is_one_line_and_exit_2(tmp_path, args):
    import subprocess
    import sys

    (tmp_path / "config.json").write_text("{not json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
    done = subprocess.run([sys.executable, "-c", "from server.cli import main; main()",
                           *[a.format(tmp=tmp_path) for a in args]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "error" in done.stderr.lower()
