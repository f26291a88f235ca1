"""Networks for the benches: the reference size built in process, and saved stand-ins."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import save_model
from model.config import ModelConfig
from model.network import S4Network

REFERENCE = dict(n_layers=4, d_model=128, d_state=64)


def perturbed_network(layer: str, seed: int = 0, **fields) -> S4Network:
    """A random network with parameters moved off their initialisation, as after training."""
    torch.manual_seed(seed)
    options = dict(name=f"bench-{layer}", task="sequence", layer=layer, d_input=1, d_output=1)
    options.update(REFERENCE)
    options.update(fields)
    net = S4Network(ModelConfig(**options)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * p.std(correction=0).clamp(min=0.05) * torch.randn_like(p))
    return net


# Shapes of the shipped models, used when model/zoo/<name> is not there yet.
STAND_INS = {
    "motion": dict(task="classification", layer="s4d", d_input=3, d_output=6, d_model=64,
                   n_layers=4, d_state=64, sample_rate=100.0,
                   labels=["walking", "running", "sitting", "standing", "upstairs", "downstairs"]),
    "digits": dict(task="classification", layer="s4d", d_input=1, d_output=10, d_model=64,
                   n_layers=4, d_state=64, sample_rate=16000.0,
                   labels=[str(i) for i in range(10)]),
}  # fmt: skip

ZOO = Path(__file__).resolve().parents[2] / "model" / "zoo"


def served_model(name: str, scratch: Path) -> tuple[Path, str]:
    """The shipped model's directory, or a saved random stand-in of its shape (and which)."""
    shipped = ZOO / name
    if (shipped / "config.json").is_file():
        return shipped, "shipped"
    fields = {**STAND_INS[name], "name": name}
    net = perturbed_network(fields.pop("layer"), seed=1, **fields)
    return save_model(net, scratch / name), f"random stand-in (model/zoo/{name} missing)"
