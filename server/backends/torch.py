"""The PyTorch backend: the model package's own network, conv and recurrent views."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from cachetools import LRUCache

from model.card import read_card
from model.checkpoint import load_model
from model.fused import FusedStep, inductor_available
from model.native_step import NativeStep, unsupported
from server.backends.base import ModelBackend, ModelInfo, resolve_device
from server.state_blob import TensorSpec

log = logging.getLogger("s4serve.backends.torch")


STEP_COMPILERS = ("auto", "native", "aoti", "inductor", "torchscript")


class TorchBackend(ModelBackend):
    """Steps of many sessions run as one compiled step for every rate when a compiler is there
    (S4D: the native C step, in place on the slot pool's rows; else an AOTInductor package
    cached on disk, else a torch.compile graph), else as a TorchScript graph per rate."""

    kind = "torch"

    def __init__(self, model_dir: Path, device: str = "auto", max_rates: int = 8,
                 step_compiler: str = "auto", compile_cache: Path | None = None) -> None:
        self._device = resolve_device(device)
        self._compile_cache = Path(compile_cache or "var/compiled")
        self.net = load_model(model_dir).to(self._device).eval()
        self._max_rates = max_rates
        # Discretising for a rate is costly, so the network caches its recurrent forms, a few
        # rates at most (clients choose rates: an unbounded cache would let them grow memory).
        # Streams and predict-with-state share that one cache.
        self.net.recurrent_cache_size = max_rates
        # the step path looks its rate up here first: the network's own cache checks every
        # parameter's version on each call (~55 us), and served weights never change
        self._recs: LRUCache = LRUCache(maxsize=max_rates)
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
        if step_compiler not in STEP_COMPILERS:
            raise ValueError(f"unknown step compiler {step_compiler!r}: expected one of "
                             f"{', '.join(STEP_COMPILERS)}")
        if step_compiler == "auto":
            step_compiler = ("native" if rec is not None and unsupported(rec) is None
                             else "aoti" if inductor_available() else "torchscript")
        self.step_compiler = step_compiler if rec is not None else "torchscript"
        self._fused = None  # built by warmup (an AOTInductor build can take a minute)

    def _build_step(self) -> None:
        """The compiled flat step, falling back down native -> aoti -> inductor -> torchscript
        when one does not build here (no compiler headers, a network the native step does not
        cover), and saying so."""
        from model.aot_step import AotStep

        rec = self._recurrence(1.0)
        order = ["native", "aoti", "inductor"]
        for compiler in order[order.index(self.step_compiler):]:
            try:
                if compiler == "native":
                    step = NativeStep(rec, self.layout, self._compile_cache)
                elif compiler == "aoti":
                    step = AotStep(rec, self.layout, self._compile_cache)
                else:
                    step = FusedStep(rec, self.layout)
                self._fused, self.step_compiler = step, compiler
                super().warmup()  # a torch.compile graph compiles on its first calls
                return
            except Exception:  # the next compiler serves
                log.warning("model %s: the %s step did not build", self.info.name, compiler,
                            exc_info=True)
        self._fused, self.step_compiler = None, "torchscript"

    def warmup(self) -> None:
        if self.step_compiler in ("native", "aoti", "inductor"):
            self._build_step()
        if self._fused is None:
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
        rec = self._recs.get(rate)
        if rec is None:
            with torch.inference_mode():
                rec = self._recs[rate] = self.net.recurrent(rate)
        return rec

    @torch.inference_mode()
    def step(self, u, state, rate):
        # TorchScript: traced once per rate on first use
        return self._recurrence(rate).compiled_step("torchscript")(u, state)

    @torch.inference_mode()
    def step_flat(self, u, flat32, flat64, rate):
        if self._fused is None:
            return super().step_flat(u, flat32, flat64, rate)
        return self._fused(self._recurrence(rate), u, flat32, flat64)

    @property
    def rows_in_place(self) -> bool:
        return isinstance(self._fused, NativeStep)

    @property
    def block_steps(self) -> int:
        return self._fused.narrow_steps if self.rows_in_place else 1

    def step_rows_into(self, u, pool32, pool64, rows, rate, y, kept, steps=None):
        if not self.rows_in_place:
            return super().step_rows_into(u, pool32, pool64, rows, rate, y, kept, steps)
        # no inference_mode: the C step records no autograd graph (it cost ~5 us a call)
        return self._fused.at_rows_into(self._recurrence(rate), u, pool32, pool64, rows, y, kept,
                                        steps)

    def rows_call(self, pool32, pool64, rows, rate, y, kept, keys=None, counts=None):
        if not self.rows_in_place:
            return None
        return self._fused.rows_call(self._recurrence(rate), pool32, pool64, rows, y, kept,
                                     keys, counts)

    @torch.inference_mode()
    def chunk(self, u, state, rate):
        return self._recurrence(rate).chunk(u, state)

    @torch.inference_mode()
    def chunk_flat(self, u, flat32, flat64, rate):
        chunk = getattr(self._fused, "chunk", None)  # the native step: T steps in C
        if chunk is None:
            return super().chunk_flat(u, flat32, flat64, rate)
        return chunk(self._recurrence(rate), u, flat32, flat64)

    def conv_bytes(self, length: int) -> int:
        return self.net.conv_bytes(length)

    @torch.inference_mode()
    def predict(self, u, rate, state=None, return_state=False, last=False, max_batch=None,
                pool=None, out=None):
        return self.net.predict(u, rate=rate, state=state, return_state=return_state,
                                last=last, max_batch=max_batch, pool=pool,
                                out=out)


class InductorTorchBackend(TorchBackend):
    """The torch backend with the inductor step required (`--backend torch-inductor`);
    ModelInfo still says "torch"."""

    def __init__(self, model_dir: Path, device: str = "auto", max_rates: int = 8,
                 compile_cache: Path | None = None) -> None:
        super().__init__(model_dir, device, max_rates, step_compiler="inductor",
                         compile_cache=compile_cache)
