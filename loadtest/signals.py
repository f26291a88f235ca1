"""Input signals for load tests: synthetic (sine, noise) or real (a .npy file)."""

from __future__ import annotations

import numpy as np


def load_npy_signals(path: str, d_input: int) -> np.ndarray:
    """A .npy of shape (L,), (L, d_input) or (n, L, d_input) as (n, L, d_input)."""
    data = np.load(path, allow_pickle=False)
    if data.ndim == 1:
        data = data[None, :, None]
    elif data.ndim == 2:
        data = data[None] if data.shape[1] == d_input else data[:, :, None]
    if data.ndim != 3 or data.shape[2] != d_input:
        raise ValueError(f"{path}: shape {data.shape} does not fit d_input={d_input}")
    if data.dtype == np.int16:
        return data.astype(np.float32) / 32768.0
    return data.astype(np.float32)


def synthetic_signal(kind: str, length: int, d_input: int, seed: int) -> np.ndarray:
    """A (length, d_input) float32 signal in [-1, 1), different per seed."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return np.clip(rng.normal(0.0, 0.3, (length, d_input)), -1.0, 0.999).astype(np.float32)
    t = np.arange(length, dtype=np.float64)[:, None]
    freq = rng.uniform(0.001, 0.05, (1, d_input))  # cycles per sample
    phase = rng.uniform(0, 2 * np.pi, (1, d_input))
    wave = 0.6 * np.sin(2 * np.pi * freq * t + phase) + rng.normal(0.0, 0.02, (length, d_input))
    return np.clip(wave, -1.0, 0.999).astype(np.float32)


class SignalSource:
    """Per-session signals: cycles through a file's sequences, or makes one per session."""

    def __init__(self, kind: str, d_input: int, seed: int = 0, npy_path: str | None = None):
        self.kind = kind
        self.d_input = d_input
        self.seed = seed
        self._file = load_npy_signals(npy_path, d_input) if kind == "npy" else None

    def for_session(self, index: int, length: int) -> np.ndarray:
        """(length, d_input) float32 for session `index`; a file's sequence repeats if short."""
        if self._file is None:
            return synthetic_signal(self.kind, length, self.d_input, self.seed * 100_003 + index)
        seq = self._file[index % len(self._file)]
        reps = -(-length // len(seq))
        return np.tile(seq, (reps, 1))[:length]

    def batch(self, batch: int, length: int) -> np.ndarray:
        """(batch, length, d_input) float32."""
        return np.stack([self.for_session(i, length) for i in range(batch)])
