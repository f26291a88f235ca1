"""The PyTorch backend: the model package's own network, conv and recurrent views."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import load_model
from server.backends.base import ModelBackend, ModelInfo, resolve_device
from server.state_blob import TensorSpec


class TorchBackend(ModelBackend):
    kind = "torch"
    step_compiler = "torchscript"  # see RecurrentNetwork.compiled_step

    def __init__(self, model_dir: Path, device: str = "auto", max_rates: int = 8) -> None:
        self._device = resolve_device(device)
        self.net = load_model(model_dir).to(self._device).eval()
        self._max_rates = max_rates
        # Discretising for a rate is costly, so the network caches its recurrent forms, a few
        # rates at most (clients choose rates: an unbounded cache would let them grow memory).
        # Streams and predict-with-state share that one cache.
        self.net.recurrent_cache_size = max_rates
        rec = self._recurrence(1.0)
        self._spec = [
            TensorSpec(name, tuple(int(n) for n in shape), str(dtype).removeprefix("torch."))
            for name, shape, dtype in rec.state_spec
        ]
        cfg = self.net.config
        self._info = ModelInfo(
            name=cfg.name,
            version=str(cfg.version),
            layer=cfg.layer,
            task=cfg.task,
            d_input=cfg.d_input,
            d_output=cfg.d_output,
            labels=list(cfg.labels) if cfg.labels else None,
            sample_rate=float(cfg.sample_rate) if cfg.sample_rate else None,
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            d_state=cfg.d_state,
            state_bytes=int(rec.state_bytes),
            device=str(self._device),
            backend=self.kind,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def state_spec(self) -> list[TensorSpec]:
        return self._spec

    def _recurrence(self, rate: float):
        with torch.inference_mode():
            return self.net.recurrent(rate)

    @torch.inference_mode()
    def step(self, u, state, rate):
        # compiled once per rate on first use; only the compute thread steps
        return self._recurrence(rate).compiled_step(self.step_compiler)(u, state)

    @torch.inference_mode()
    def chunk(self, u, state, rate):
        return self._recurrence(rate).chunk(u, state)

    @torch.inference_mode()
    def predict(self, u, rate, state=None, return_state=False):
        return self.net.predict(u, rate=rate, state=state, return_state=return_state)


class InductorTorchBackend(TorchBackend):
    """The torch backend with steps compiled by torch.compile (opt-in: `--backend
    torch-inductor`); ModelInfo still says "torch"."""

    step_compiler = "inductor"
