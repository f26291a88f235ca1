"""The onnxruntime backend: streaming step and chunk run exported ONNX graphs on the CPU.

Graphs bake in the discretisation, so each sample rate has its own export. At load time the
backend uses graphs pre-exported into `<model_dir>/onnx/` when their manifest matches the
checkpoint (same weights fingerprint) and rate; otherwise it exports into a cache directory
(the `onnx_cache` setting, $S4SERVE_ONNX_CACHE; default ~/.cache/s4serve/onnx), keyed by
fingerprint, rate and block
length, and reuses it on the next start. A client at a new sample rate waits for one export
(seconds); at most `max_rates` rates are kept loaded.

`predict` of whole sequences without a state delegates to the torch convolutional view (FFT,
complex arithmetic, which ONNX cannot express with a dynamic batch); with a state in or out it
runs the ONNX chunk graphs, like a stream does. ModelInfo says backend "onnx", device "cpu".
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from cachetools import LRUCache

from model.network import check_input
from model.onnx_export import DEFAULT_CHUNK, export_onnx, fingerprint, read_manifest
from model.onnx_runtime import OnnxRecurrence
from server.backends.base import ModelBackend
from server.backends.torch import TorchBackend

PREEXPORTED_DIR = "onnx"
LADDER_FACTOR = 4  # extra block lengths T/4, T/16, ... so any frame needs few graph calls
LADDER_MIN = 4


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "s4serve" / "onnx"


def ladder(block: int) -> tuple[int, ...]:
    """Block lengths below `block` that the chunk graphs cover: block/4, block/16, ... >= 4."""
    sizes, t = [], block // LADDER_FACTOR
    while t >= LADDER_MIN:
        sizes.append(t)
        t //= LADDER_FACTOR
    return tuple(sizes)


def _usable(directory: Path, digest: str, rate: float) -> bool:
    manifest = read_manifest(directory)
    return (manifest is not None and manifest["fingerprint"] == digest
            and float(manifest["rate"]) == float(rate))


class OnnxBackend(TorchBackend):
    """TorchBackend's model metadata and conv view, with step/chunk run by onnxruntime."""

    kind = "onnx"

    def __init__(self, model_dir: Path, device: str = "auto", max_rates: int = 8,
                 cache_dir: Path | None = None, threads: int | None = None) -> None:
        if device not in ("auto", "cpu"):
            raise ValueError(f"the onnx backend runs on the CPU (onnxruntime CPU provider), "
                             f"not {device!r}; use device cpu or the torch backend")
        super().__init__(Path(model_dir), device="cpu", max_rates=max_rates,
                         step_compiler="torchscript")
        self.model_dir = Path(model_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.threads = threads
        self.block = min(self.net.config.chunk_max, DEFAULT_CHUNK)
        if self.net.config.layer == "s4" and self.block & (self.block - 1):
            self.block = 1 << (self.block.bit_length() - 1)  # S4 blocks are powers of two
        self.fingerprint = fingerprint(self.net)
        self._graphs: LRUCache = LRUCache(max_rates)  # OnnxRecurrence by rate
        self._graphs_lock = threading.Lock()
        self.graphs(1.0)  # export or load now, so load time (not the first client) pays

    def export_dir(self, rate: float) -> Path:
        """Where the graphs for this rate are: pre-exported in the model dir, else the cache."""
        shipped = self.model_dir / PREEXPORTED_DIR
        if _usable(shipped, self.fingerprint, rate):
            return shipped
        return self.cache_dir / self.fingerprint[:24] / f"rate{rate:.9g}-T{self.block}"

    def _export(self, rate: float, target: Path) -> None:
        # Export next to the target and rename, so a concurrent process never sees half a dir.
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
        try:
            export_onnx(self.net, tmp, rate=rate, chunk=self.block,
                        extra_chunks=ladder(self.block))
            try:
                tmp.rename(target)
            except OSError:  # another process won the race; its export is as good
                if not _usable(target, self.fingerprint, rate):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def graphs(self, rate: float) -> OnnxRecurrence:
        """The onnxruntime sessions for a rate, exporting them first if needed (LRU-bounded)."""
        with self._graphs_lock:
            rec = self._graphs.get(rate)
            if rec is not None:
                return rec
            directory = self.export_dir(rate)
            if not _usable(directory, self.fingerprint, rate):
                shutil.rmtree(directory, ignore_errors=True)  # stale or partial
                self._export(rate, directory)
            rec = OnnxRecurrence(directory, self.threads)
            self._graphs[rate] = rec
            return rec

    @staticmethod
    def _to_numpy(state: list[torch.Tensor]) -> list[np.ndarray]:
        return [x.detach().cpu().numpy() for x in state]

    @staticmethod
    def _to_torch(y: np.ndarray, state: list[np.ndarray]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return torch.from_numpy(y), [torch.from_numpy(x) for x in state]

    def step_flat(self, u, flat32, flat64, rate):  # the graphs step, not torch
        return ModelBackend.step_flat(self, u, flat32, flat64, rate)

    def step(self, u, state, rate):
        y, new_state = self.graphs(rate).step(u.detach().cpu().numpy(), self._to_numpy(state))
        return self._to_torch(y, new_state)

    def chunk(self, u, state, rate):
        y, new_state = self.graphs(rate).chunk(u.detach().cpu().numpy(), self._to_numpy(state))
        return self._to_torch(y, new_state)

    def predict(self, u, rate, state=None, return_state=False, last=False, max_batch=None,
                pool=None, out=None):
        if state is None and not return_state:  # the torch conv view
            return super().predict(u, rate, last=last, max_batch=max_batch, pool=pool,
                                   out=out)
        check_input(u, self.info.d_input)
        if state is None:
            state = self.initial_state(u.shape[0])
        self._recurrence(1.0).check_state(state, u.shape[0])  # same layout at every rate
        return self.chunk(u, state, rate)
