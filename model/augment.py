"""Training-time augmentation of raw waveforms: speed, random gain, band limit and noise.

Applied to standardised training batches only, never to held-out data. The band limit teaches
a model trained at one rate not to rely on content above the Nyquist frequency of a lower rate
it may be served at (the digits model lost 60 % of its accuracy at 8 kHz for exactly that
reason; docs/models.md). Speed perturbation (playing a clip 0.85-1.15x as fast) moves pitch,
formants and tempo together, the usual way to make a few speakers sound like many. All
randomness comes from the caller's seeded generator.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Augment(BaseModel):
    """What to do to each training sequence, independently per sequence."""

    model_config = ConfigDict(extra="forbid")

    speed_prob: float = Field(0.0, ge=0, le=1, description="chance of a speed change")
    speed: tuple[float, float] = Field((0.85, 1.15), description="playback speed factor range")
    lowpass_prob: float = Field(0.0, ge=0, le=1, description="chance of a brick-wall low-pass")
    lowpass_hz: tuple[float, float] = Field((3400.0, 4000.0),
                                            description="cut-off drawn uniformly in this range")
    gain_db: tuple[float, float] = Field((0.0, 0.0), description="gain drawn uniformly (dB)")
    noise_prob: float = Field(0.0, ge=0, le=1, description="chance of added white noise")
    noise_snr_db: tuple[float, float] = Field((20.0, 40.0), description="signal-to-noise range")


def lowpass(x: np.ndarray, cutoff_hz: np.ndarray, sample_rate: float) -> np.ndarray:
    """Zero every frequency above each sequence's cut-off. x (B, L, C), cutoff_hz (B,)."""
    spectrum = np.fft.rfft(x, axis=1)  # (B, F, C)
    freqs = np.fft.rfftfreq(x.shape[1], 1.0 / sample_rate)  # (F,)
    keep = freqs[None, :] <= cutoff_hz[:, None]  # (B, F)
    return np.fft.irfft(spectrum * keep[:, :, None], n=x.shape[1], axis=1).astype(x.dtype)


def change_speed(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Each sequence played `factor` times as fast by linear interpolation, same length, zeros
    past its end. x (B, L, C), factor (B,)."""
    length = x.shape[1]
    grid = np.arange(length, dtype=np.float64)  # (L,)
    out = np.zeros_like(x)
    for row, f in enumerate(factor):
        where = grid * f  # (L,) source positions
        inside = where <= length - 1
        for ch in range(x.shape[2]):
            out[row, inside, ch] = np.interp(where[inside], grid, x[row, :, ch])
    return out


def augment(x: np.ndarray, settings: Augment, sample_rate: float,
            rng: np.random.Generator) -> np.ndarray:
    """A randomly altered copy of the batch x (B, L, C)."""
    batch = x.shape[0]
    out = x.copy()
    faster = rng.random(batch) < settings.speed_prob  # (B,)
    if faster.any():
        out[faster] = change_speed(out[faster], rng.uniform(*settings.speed,
                                                            size=int(faster.sum())))
    chosen = rng.random(batch) < settings.lowpass_prob  # (B,)
    if chosen.any():
        cutoff = rng.uniform(*settings.lowpass_hz, size=int(chosen.sum()))
        out[chosen] = lowpass(out[chosen], cutoff, sample_rate)
    gain = 10.0 ** (rng.uniform(*settings.gain_db, size=batch) / 20.0)  # (B,)
    out *= gain[:, None, None].astype(out.dtype)
    noisy = rng.random(batch) < settings.noise_prob  # (B,)
    if noisy.any():
        power = (out[noisy] ** 2).mean(axis=(1, 2))  # (B',)
        snr = 10.0 ** (rng.uniform(*settings.noise_snr_db, size=int(noisy.sum())) / 10.0)
        std = np.sqrt(power / snr)[:, None, None]  # (B', 1, 1)
        out[noisy] += (rng.standard_normal(out[noisy].shape) * std).astype(out.dtype)
    return out
