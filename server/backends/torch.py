"""The PyTorch backend: the model package's own network, conv and recurrent views."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.card import read_card
from model.checkpoint import load_model
from model.fused import FusedStep, inductor_available
from server.backends.base import ModelBackend, ModelInfo, resolve_device
from server.state_blob import TensorSpec

log = logging.getLogger("s4serve.backends.torch")


class TorchBackend(ModelBackend):
    """Steps of many sessions run as one fused, compiled graph for every rate (inductor) when
    a C++ compiler is there, else as a TorchScript graph per rate."""

    kind = "torch"

    def __init__(self, model_dir: Path, device: str = "auto", max_rates: int = 8,
                 step_compiler: str = "auto") -> None:
        self._device = resolve_device(device)
        self.net = load_model(model_dir).to(self._device).eval()
        self._max_rates = max_rates
        # Discretising for a rate is costly, so the network caches its recurrent forms, a few
        # rates at most (clients choose rates: an unbounded cache would let them grow memory).
        # Streams and predict-with-state share that one cache.
        self.net.recurrent_cache_size = max_rates
        cfg = self.net.config
        rec = self._recurrence(1.0) if cfg.streamable else None
        self._spec = [
            TensorSpec(name, tuple(int(n) for n in shape), str(dtype).removeprefix("torch."))
            for name, shape, dtype in (rec.state_spec if rec is not None else [])
        ]
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
            state_bytes=int(rec.state_bytes) if rec is not None else 0,
            device=str(self._device),
            backend=self.kind,
            streamable=cfg.streamable,
            card=card.model_dump() if (card := read_card(model_dir)) else None,
        )
        if step_compiler not in ("auto", "inductor", "torchscript"):
            raise ValueError(f"unknown step compiler {step_compiler!r}: expected auto, "
                             "inductor or torchscript")
        if step_compiler == "auto":
            step_compiler = "inductor" if inductor_available() else "torchscript"
        self.step_compiler = step_compiler
        self._fused = (FusedStep(rec, self.layout)
                       if step_compiler == "inductor" and rec is not None else None)

    def warmup(self) -> None:
        """Also compiles the fused step; if that fails (no compiler headers, say), the
        TorchScript step serves instead, and says so."""
        try:
            super().warmup()
        except Exception:
            if self._fused is None:
                raise
            log.warning("model %s: the inductor step did not compile; serving the TorchScript "
                        "step", self.info.name, exc_info=True)
            self._fused, self.step_compiler = None, "torchscript"
            super().warmup()
        log.info("model %s: streaming step compiled with %s", self.info.name,
                 self.step_compiler)

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
        # TorchScript: traced once per rate on first use
        return self._recurrence(rate).compiled_step("torchscript")(u, state)

    @torch.inference_mode()
    def step_flat(self, u, flat32, flat64, rate):
        if self._fused is None:
            return super().step_flat(u, flat32, flat64, rate)
        return self._fused(self._recurrence(rate), u, flat32, flat64)

    @torch.inference_mode()
    def chunk(self, u, state, rate):
        return self._recurrence(rate).chunk(u, state)

    def conv_bytes(self, length: int) -> int:
        return self.net.conv_bytes(length)

    @torch.inference_mode()
    def predict(self, u, rate, state=None, return_state=False, last=False, max_batch=None):
        return self.net.predict(u, rate=rate, state=state, return_state=return_state,
                                last=last, max_batch=max_batch)


class InductorTorchBackend(TorchBackend):
    """The torch backend with the inductor step required (`--backend torch-inductor`);
    ModelInfo still says "torch"."""

    def __init__(self, model_dir: Path, device: str = "auto", max_rates: int = 8) -> None:
        super().__init__(model_dir, device, max_rates, step_compiler="inductor")
