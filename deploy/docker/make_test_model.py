"""Writes a tiny random S4D model directory, for smoke tests when no shipped model is at hand.

    python deploy/docker/make_test_model.py OUT_DIR      # writes OUT_DIR/config.json + weights
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from model.checkpoint import save_model
from model.config import ModelConfig
from model.network import S4Network


def make_test_model(directory: Path, name: str = "smoke") -> Path:
    """Small enough to load and warm in a second; two input channels so the interleaving of
    binary frames is exercised."""
    torch.manual_seed(0)
    config = ModelConfig(name=name, task="sequence", layer="s4d", d_input=2, d_output=3,
                         d_model=16, n_layers=2, d_state=8, sample_rate=100.0)
    return Path(save_model(S4Network(config), Path(directory)))


if __name__ == "__main__":
    print(make_test_model(Path(sys.argv[1])))
