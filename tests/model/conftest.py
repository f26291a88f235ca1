import torch

from model.config import ModelConfig
from model.network import S4Network


def perturbed_network(seed: int = 0, **overrides) -> S4Network:
    """A network whose parameters are moved off their initialisation (as after training)."""
    torch.manual_seed(seed)
    fields = dict(d_input=3, d_output=5, d_model=16, n_layers=2, d_state=16, chunk_max=64)
    fields.update(overrides)
    net = S4Network(ModelConfig(**fields)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * p.std().clamp(min=0.05) * torch.randn_like(p))
    return net
