"""Model directories: `config.json` + `model.safetensors` (+ optional `metrics.json`).

Loading never unpickles: safetensors holds only tensors, the config is validated JSON, and
every tensor is checked against the architecture the config describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.network import S4Network

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"


class CheckpointError(ValueError):
    """A model directory that cannot be loaded, with the reason."""


def check_output_directory(directory: str | Path, force: bool = False,
                           replaceable: frozenset[str] = frozenset()) -> Path:
    """Where a command is about to write: refused (ValueError) when it is a file, or a
    directory holding anything but `replaceable` names, unless `force`. Checked before any
    work, so that a long run does not end on it."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and not force:
        others = sorted(p.name for p in out.iterdir() if p.name not in replaceable)
        if others:
            raise ValueError(f"{out} is not empty ({', '.join(others[:4])}"
                             f"{', ...' if len(others) > 4 else ''}): choose a new directory "
                             "or pass --force to write into it")
    return out


def save_model(net: S4Network, directory: str | Path, metrics: dict | None = None) -> Path:
    """Write the network's config and float32 weights; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    net.config.to_json(out / CONFIG_FILE)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in net.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "s4serve",
                                                           "format_version": "1"})
    (out / WEIGHTS_FILE).chmod(0o644)  # readable by a server running as another user
    if metrics is not None:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return out


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not an s4serve model directory)")
    try:
        return ModelConfig.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from exc


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> S4Network:
    """Rebuild the network from its config and load weights, checking every name and shape."""
    config = load_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file: {exc}") from exc
    net = S4Network(config)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match {CONFIG_FILE}: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{weights}: tensor {key} has shape {tuple(tensors[key].shape)} but the config "
                f"implies {tuple(ref.shape)}")
        if not torch.isfinite(tensors[key]).all():
            raise CheckpointError(f"{weights}: tensor {key} contains NaN or Inf")
    net.load_state_dict(tensors)
    return net.to(device).eval()


def load_metrics(directory: str | Path) -> dict | None:
    path = Path(directory) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
