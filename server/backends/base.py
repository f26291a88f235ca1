"""The interface every runtime (torch, onnx, ...) implements for the server.

Tensors crossing this interface are torch tensors on `backend.device` (a CPU runtime such as
onnxruntime converts with zero-copy `.numpy()`), batch first. States are lists of tensors laid
out as `state_spec` says, so the scheduler can keep them in slot tensors and gather/scatter rows.
`step`/`chunk` must be pure functions of their inputs and safe to call from one compute thread
while `predict` runs on another.
"""

from __future__ import annotations

import array
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.fused import StateLayout
from server.errors import ServeError
from server.state_blob import TensorSpec

# How far a client's sample rate may be from the model's: dt scales by the ratio, and far
# outside this range the discretisation under- or overflows (e.g. 1 Hz for a 16 kHz model).
RATE_RANGE = 16.0

# backend name -> "module:class"; a new runtime adds one line here.
_REGISTRY = {
    "torch": "server.backends.torch:TorchBackend",
    "torch-inductor": "server.backends.torch:InductorTorchBackend",  # torch, inductor forced
    "onnx": "server.backends.onnx:OnnxBackend",
}


@dataclass(frozen=True)
class ModelInfo:
    """The public description of a served model (the contract's ModelInfo)."""

    name: str
    version: str
    layer: str
    task: str
    d_input: int
    d_output: int
    labels: list[str] | None
    sample_rate: float | None
    n_layers: int
    d_model: int
    d_state: int
    state_bytes: int
    device: str
    backend: str
    streamable: bool = True  # False: predict only (bidirectional layers read the future)
    card: dict[str, Any] | None = None  # the model card's key facts (model/card.py)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def refuse_unstreamable(info: ModelInfo, what: str = "streams") -> None:
    """ServeError `not_streamable` for a model without a recurrent form."""
    if not info.streamable:
        raise ServeError("not_streamable", f"model {info.name!r} has bidirectional layers (each "
                         "output reads future samples): it serves whole sequences through "
                         f"predict, not {what}")


class ModelBackend(ABC):
    """One loaded model on one device."""

    kind: str = "abstract"

    @property
    @abstractmethod
    def info(self) -> ModelInfo: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def state_spec(self) -> list[TensorSpec]: ...

    @abstractmethod
    def step(
        self, u: torch.Tensor, state: list[torch.Tensor], rate: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One sample for B sessions: u (B, d_input) -> y (B, d_output), new state."""

    @abstractmethod
    def chunk(
        self, u: torch.Tensor, state: list[torch.Tensor], rate: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """T samples for B sessions: u (B, T, d_input) -> y (B, T, d_output), new state."""

    @property
    def layout(self) -> StateLayout:
        """The state as flat float32 / float64 rows (how the slot pool keeps it)."""
        layout = self.__dict__.get("_layout")
        if layout is None:
            layout = self.__dict__["_layout"] = StateLayout.of(
                (s.name, s.shape, s.dtype) for s in self.state_spec)
        return layout

    def step_flat(self, u: torch.Tensor, flat32: torch.Tensor, flat64: torch.Tensor,
                  rate: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`step` on flat states: u (B, d_input), (B, W32), (B, W64) -> y, new rows. A backend
        may advance the given rows in place and return them (the native step does)."""
        y, state = self.step(u, self.layout.split(flat32, flat64), rate)
        return (y, *self.layout.join(state))

    # whether `step_rows_into` can advance a slot pool's rows where they lie
    rows_in_place: bool = False
    # the most samples per row `step_rows_into` advances as exactly that many single steps
    block_steps: int = 1

    def step_rows_into(self, u: np.ndarray, pool32: torch.Tensor, pool64: torch.Tensor,
                       rows: np.ndarray, rate: float, y: np.ndarray, kept: np.ndarray,
                       steps: np.ndarray | None = None) -> int:
        """Rows `rows` (distinct) of a slot pool's state advanced by one sample where they lie
        (when `rows_in_place`; else the caller gathers, steps and scatters): u (B, d_input)
        read, y (B, d_output) written, both numpy views of any row stride (the records of a
        wire message and of its reply need no copy); kept (B) uint8 set to whether each row
        advanced (its input and output finite; the others are left as they were). With
        `steps` (B,) int64: row b advances by steps[b] samples as one block (exactly that
        many steps, kept whole or not at all), u (B, K, d_input) and y (B, K, d_output)
        contiguous, K >= every steps[b]. Returns how many did."""
        raise NotImplementedError(f"the {self.kind} backend steps gathered rows only")

    def rows_call(self, pool32: torch.Tensor, pool64: torch.Tensor, rows: np.ndarray,
                  rate: float, y: np.ndarray, kept: np.ndarray, keys: np.ndarray | None = None,
                  counts: array.array | None = None
                  ) -> Callable[[bytes, int, int], int | None] | None:
        """`step_rows_into` for fixed rows, outputs and flags, prepared once for many calls
        (a connection that sends the same sessions every tick), each with its inputs in a
        byte buffer: call(data, offset, stride) reads row b's d_input float32 inputs at
        data[offset + b * stride:] and returns how many rows advanced; with `keys` (B, 2)
        uint32, the 8 bytes before each input must equal its row of keys, else the call
        returns None and changes nothing; with `counts` (array "q", one per pool row), each
        call adds one to the count of every row it advanced. None where the backend has no
        such call (when not `rows_in_place`)."""
        return None

    def chunk_flat(self, u: torch.Tensor, flat32: torch.Tensor, flat64: torch.Tensor,
                   rate: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`chunk` on flat states: u (B, T, d_input) -> y (B, T, d_output), new rows."""
        y, state = self.chunk(u, self.layout.split(flat32, flat64), rate)
        return (y, *self.layout.join(state))

    @abstractmethod
    def predict(
        self,
        u: torch.Tensor,
        rate: float,
        state: list[torch.Tensor] | None = None,
        return_state: bool = False,
        last: bool = False,
        max_batch: int | None = None,
        pool: Executor | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Whole sequences u (B, L, d_input) through the convolutional view (or the exact
        chunked recurrence when a state goes in or must come out). `last`: only the final
        outputs may be returned, (B, 1, d_output); `max_batch`: sequences per conv pass;
        `pool`: threads that may run those passes side by side; `out`: where the conv view may
        write its outputs (the caller uses what is returned)."""

    def conv_bytes(self, length: int) -> int:
        """Estimated peak bytes per sequence of a convolutional pass (0: unknown)."""
        return 0

    def warmup(self) -> None:
        """Run every code path once so the first client does not pay for setup."""
        d_in = self.info.d_input
        if not self.info.streamable:
            self.predict(torch.zeros(1, 16, d_in, device=self.device), 1.0)
            return
        state = self.initial_state(2)
        self.step(torch.zeros(2, d_in, device=self.device), state, 1.0)
        self.chunk(torch.zeros(2, 3, d_in, device=self.device), state, 1.0)
        for batch in (1, 2):  # a compiled flat step builds its B=1 and B>1 graphs here
            flat32, flat64 = self.layout.join(self.initial_state(batch))
            self.step_flat(torch.zeros(batch, d_in, device=self.device), flat32, flat64, 1.0)
        self.predict(torch.zeros(1, 16, d_in, device=self.device), 1.0)

    def initial_state(self, batch: int) -> list[torch.Tensor]:
        return [
            torch.zeros((batch, *s.shape), dtype=getattr(torch, s.dtype), device=self.device)
            for s in self.state_spec
        ]

    def rate_for(self, sample_rate: float | None) -> float:
        """The dt scale factor for a client's sample rate (1.0 = the model's own)."""
        model_rate = self.info.sample_rate
        if sample_rate is None:
            return 1.0
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | float):
            raise ServeError("bad_request", "sample_rate must be a number")
        if not (0 < sample_rate < float("inf")):
            raise ServeError("bad_request", "sample_rate must be a positive finite number")
        if model_rate is None:
            raise ServeError(
                "bad_request", f"model {self.info.name!r} has no sample rate; omit sample_rate"
            )
        rate = float(sample_rate) / float(model_rate)
        if not 1 / RATE_RANGE <= rate <= RATE_RANGE:
            raise ServeError(
                "bad_request", f"sample_rate must be within {RATE_RANGE}x of the model's "
                f"{model_rate:g} Hz: {model_rate / RATE_RANGE:g} to {model_rate * RATE_RANGE:g}"
            )
        return rate


def load_backend(kind: str, model_dir: Path, device: str, max_rates: int = 8,
                 step_compiler: str = "auto", compile_cache: Path | None = None,
                 onnx_cache: Path | None = None, onnx_threads: int = 0) -> ModelBackend:
    """Instantiate the backend registered under `kind` for one model directory;
    `step_compiler` applies to the torch backend (auto, aoti, inductor or torchscript),
    `compile_cache` to the torch backends (where compiled step packages are kept),
    `onnx_cache` and `onnx_threads` to the onnx backend (exported graphs, intra-op threads)."""
    try:
        target = _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown backend {kind!r}; known: {sorted(_REGISTRY)}") from None
    module_name, class_name = target.split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    options: dict = {"step_compiler": step_compiler} if kind == "torch" else {}
    if kind in ("torch", "torch-inductor"):
        options["compile_cache"] = compile_cache
    elif kind == "onnx":
        options.update(cache_dir=onnx_cache, threads=onnx_threads)
    return backend_class(Path(model_dir), device=device, max_rates=max_rates, **options)


def resolve_device(device: str) -> torch.device:
    """`auto` picks the first CUDA device when there is one."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
