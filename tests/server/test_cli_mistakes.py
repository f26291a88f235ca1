"""A user's mistakes on the command line: one clear line and exit status 2, quickly, no
traceback, nothing written, and never advice to unpickle."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import load_model
from tests.server.conftest import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official-s4"
CASE = FIXTURES / "s4d_block"
MOTION = Path(__file__).resolve().parents[2] / "model" / "zoo" / "motion"
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "motion.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "garbage.pt").write_bytes(b"\x80\x04not a zip or a pickle")
    (tmp / "full").mkdir()
    (tmp / "full" / "KEEP.txt").write_text("mine")
    (tmp / "text.wav").write_text("not a wav")
    (tmp / "riff.wav").write_bytes(b"RIFF")
    np.save(tmp / "scalar.npy", np.float32(1.0))
    (tmp / "empty.csv").write_text("")
    (tmp / "ok.csv").write_text("1,2,3,4,5,6\n")
    return {"tmp": str(tmp), "case": str(CASE), "motion": str(MOTION), "config": str(CONFIG),
            "dead": f"http://127.0.0.1:{free_port()}"}


MISTAKES = {
    "import: a config that is JSON but no object": (
        ["import", "official", "--config", "{tmp}/list.json", "--weights",
         "{case}/state_dict.pt", "--out", "{tmp}/m1"], "JSON object"),
    "import: weights that are no state dict": (
        ["import", "official", "--config", "{case}/config.json", "--weights",
         "{tmp}/garbage.pt", "--out", "{tmp}/m2"], "not a plain tensor state dict"),
    "import: into a directory that holds files": (
        ["import", "official", "--config", "{case}/config.json", "--weights",
         "{case}/state_dict.pt", "--out", "{tmp}/full"], "not empty"),
    "train: into a directory that holds files (before training)": (
        ["train", "{config}", "--dataset", "basicmotions", "--out", "{tmp}/full"], "not empty"),
    "train: --limit 0": (
        ["train", "{config}", "--dataset", "basicmotions", "--out", "{tmp}/t", "--limit", "0"],
        "--limit"),
    "export: --chunk 0": (["export", "onnx", "{motion}", "--out", "{tmp}/x", "--chunk", "0"],
                          "--chunk"),
    "serve: an unknown backend": (["serve", "--backend", "bogus", "--model", "{motion}"],
                                  "backend"),
    "serve: an unknown device": (["serve", "--device", "gpu", "--model", "{motion}"], "device"),
    "stream: a URL without a scheme": (["stream", "motion", "{tmp}/ok.csv", "--url",
                                        "127.0.0.1:8000"], "not a server URL"),
    "stream: nothing listens there": (["stream", "motion", "{tmp}/ok.csv", "--url", "{dead}"],
                                      "{dead}"),
    "stream: a text file named .wav": (["stream", "motion", "{tmp}/text.wav"], "not a readable"),
    "stream: a truncated wav": (["stream", "motion", "{tmp}/riff.wav"], "not a readable"),
    "stream: a 0-d .npy": (["stream", "motion", "{tmp}/scalar.npy"], "shape"),
    "stream: an empty csv": (["stream", "motion", "{tmp}/empty.csv"], "no samples"),
    "loadtest predict: nothing listens there": (
        ["loadtest", "predict", "--url", "{dead}", "--model", "motion"], "{dead}"),
    "loadtest stream: nothing listens there": (
        ["loadtest", "stream", "--url", "{dead}", "--model", "motion", "--hold", "1"],
        "cannot connect"),
    "loadtest stream: zero sessions": (
        ["loadtest", "stream", "--url", "{dead}", "--model", "motion", "--sessions", "0"],
        "sessions"),
    "loadtest echo: zero workers": (["loadtest", "echo", "--workers", "0"], "--workers"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_is_one_clear_line_and_exit_2(files, mistake):
    argv, words = MISTAKES[mistake]
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from server.cli import main; main()",
                           *[a.format(**files) for a in argv]],
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - began
    output = " ".join((done.stdout + done.stderr).replace("│", " ").split())  # rich's box
    assert done.returncode == 2, output
    assert "Traceback" not in output and words.format(**files) in output, output
    assert "weights_only=False" not in output
    assert took < 30  # refused at once, not after a wait (the import of torch is most of it)
    assert sorted(p.name for p in (Path(files["tmp"]) / "full").iterdir()) == ["KEEP.txt"]


def test_force_writes_into_a_directory_and_a_new_export_replaces_the_last(tmp_path):
    from typer.testing import CliRunner

    from server.cli import app

    shutil.copytree(MOTION, tmp_path / "m")
    runner = CliRunner()
    first = runner.invoke(app, ["export", "onnx", str(tmp_path / "m"), "--out",
                                str(tmp_path / "m" / "onnx")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["export", "onnx", str(tmp_path / "m"), "--out",
                                str(tmp_path / "m" / "onnx")])
    assert again.exit_code == 0, again.output  # only a previous export there
    into_model = runner.invoke(app, ["import", "official", "--config", str(CASE / "config.json"),
                                     "--weights", str(CASE / "state_dict.pt"),
                                     "--out", str(tmp_path / "m"), "--force"])
    assert into_model.exit_code == 0, into_model.output
    assert load_model(tmp_path / "m").config.layer == "s4d"
    assert load_model(tmp_path / "m").config.d_input == 16  # the import, not motion (6)
