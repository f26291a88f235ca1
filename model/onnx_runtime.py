"""Running exported step/chunk graphs with onnxruntime, and step latency measurement.

`OnnxRecurrence` is the onnxruntime counterpart of `RecurrentNetwork` for one exported
directory (one rate): numpy in, numpy out, same state layout. Blocks of any length are cut into
the exported block lengths, largest first, and the rest is stepped sample by sample.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model.checkpoint import load_model
from model.network import S4Network
from model.onnx_export import SAMPLES, export_onnx, read_manifest


def make_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """`threads`: intra-op threads; None or 0: onnxruntime's choice (the physical cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1  # the graphs are chains; parallel branches gain nothing
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle workers would spin between calls and take CPU from the server's event loop.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


class OnnxRecurrence:
    """The graphs of one export directory, with `step` and `chunk` like RecurrentNetwork."""

    def __init__(self, export_dir: str | Path, threads: int | None = None) -> None:
        directory = Path(export_dir)
        manifest = read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"{directory}: no s4serve ONNX manifest")
        self.manifest = manifest
        self.rate = float(manifest["rate"])
        self.state_names: list[str] = manifest["inputs"][1:]
        self.output_names: list[str] = manifest["outputs"]
        self._step = make_session(directory / manifest["step"], threads)
        chunks = {int(t): name for t, name in manifest["chunks"].items()}
        self._chunks = [(t, make_session(directory / chunks[t], threads))
                        for t in sorted(chunks, reverse=True)]

    def initial_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, *s["shape"]), dtype=s["dtype"])
                for s in self.manifest["state_spec"]]

    def _run(self, session: ort.InferenceSession, samples: np.ndarray,
             state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {SAMPLES: np.ascontiguousarray(samples, dtype=np.float32)}
        feed.update(zip(self.state_names, (np.ascontiguousarray(x) for x in state), strict=True))
        y, *new_state = session.run(self.output_names, feed)
        return y, new_state

    def step(self, u: np.ndarray, state: list[np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """u (B, d_input) -> y (B, d_output), new state."""
        return self._run(self._step, u, state)

    def chunk(self, u: np.ndarray, state: list[np.ndarray]
              ) -> tuple[np.ndarray, list[np.ndarray]]:
        """u (B, L, d_input), any L >= 1 -> y (B, L, d_output), state after the block."""
        outs, pos, length = [], 0, u.shape[1]
        for t, session in self._chunks:
            while length - pos >= t:
                y, state = self._run(session, u[:, pos:pos + t], state)
                outs.append(y)
                pos += t
        while pos < length:
            y, state = self._run(self._step, u[:, pos], state)
            outs.append(y[:, None])
            pos += 1
        return np.concatenate(outs, axis=1), state


def _network(model: str | Path | S4Network) -> S4Network:
    return model.eval() if isinstance(model, S4Network) else load_model(model)


def _time_steps(step, u, state, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):  # warm caches and thread pools
        step(u, state)
    start = time.perf_counter()
    for _ in range(repeats):
        _, state = step(u, state)
    return (time.perf_counter() - start) / repeats


def onnx_step_latency(model: str | Path | S4Network, batch: int, repeats: int = 100,
                      rate: float = 1.0, threads: int | None = None) -> float:
    """Mean seconds per onnxruntime step call for `batch` sessions (graph exported to a temp
    dir). The state is carried from call to call, as in serving."""
    with tempfile.TemporaryDirectory(prefix="s4serve-onnx-") as tmp:
        export_onnx(_network(model), tmp, rate=rate, check=False)
        rec = OnnxRecurrence(tmp, threads)
        u = np.random.default_rng(0).standard_normal(
            (batch, rec.manifest["d_input"])).astype(np.float32)
        return _time_steps(rec.step, u, rec.initial_state(batch), repeats)


def torch_step_latency(model: str | Path | S4Network, batch: int, repeats: int = 100,
                       rate: float = 1.0) -> float:
    """Mean seconds per torch `RecurrentNetwork.step` call, for comparison."""
    net = _network(model)
    rec = net.to_recurrent(rate)
    u = torch.randn(batch, net.config.d_input, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return _time_steps(rec.step, u, rec.initial_state(batch), repeats)
