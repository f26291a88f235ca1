"""Speech synthesis and resampling with Debian's espeak-ng and sox (subprocesses, no Python deps).

Words are rendered by espeak-ng (22.05 kHz), resampled by sox's default high-quality `rate`
effect, and trimmed of leading/trailing silence so callers can place them anywhere in a window.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# sox `silence` twice around `reverse`: drop audio quieter than 0.3 % of full scale at both ends.
_TRIM_SILENCE = [
    "silence",
    "1",
    "0.005",
    "0.3%",
    "reverse",
    "silence",
    "1",
    "0.005",
    "0.3%",
    "reverse",
]


@dataclass(frozen=True)
class Utterance:
    """How to say a word: espeak-ng voice `accent+variant`, words/minute, pitch 0-99, amplitude."""

    word: str
    accent: str
    variant: str
    speed_wpm: int
    pitch: int
    amplitude: int

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"

    def file_stem(self) -> str:
        style = f"s{self.speed_wpm}_p{self.pitch}_a{self.amplitude}"
        return f"{self.voice}_{style}_{self.word}"


def require_tools() -> None:
    """Fail early, with the fix, when espeak-ng or sox is missing."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not found; install them (Debian: apt-get install espeak-ng sox)"
        )


def synthesize(utterance: Utterance, path: Path, sample_rate: int,
               data_path: Path | None = None) -> Path:
    """Render `utterance` to a mono 16-bit WAV at `sample_rate`, silence trimmed; atomic write.
    `data_path`: a directory holding an espeak-ng-data other than the system's (extra variants)."""
    speech = subprocess.run(
        [
            "espeak-ng",
            *([f"--path={data_path}"] if data_path else []),
            "-v",
            utterance.voice,
            "-s",
            str(utterance.speed_wpm),
            "-p",
            str(utterance.pitch),
            "-a",
            str(utterance.amplitude),
            "--stdout",
            utterance.word,
        ],
        check=True,
        capture_output=True,
    ).stdout
    _sox_write(speech, path, sample_rate, _TRIM_SILENCE)
    return path


def resample(source: Path, path: Path, sample_rate: int) -> Path:
    """Resample a WAV file with sox (its default high-quality rate conversion); atomic write."""
    _sox_write(source.read_bytes(), path, sample_rate, [])
    return path


def _sox_write(wav_bytes: bytes, path: Path, sample_rate: int, effects: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial.wav")
    subprocess.run(
        [
            "sox",
            "-D",  # no dither: the same speech gives the same file on every run and machine
            "-t",
            "wav",
            "-",
            "-r",
            str(sample_rate),
            "-c",
            "1",
            "-b",
            "16",
            str(partial),
            *effects,
        ],
        input=wav_bytes,
        check=True,
        capture_output=True,
    )
    partial.replace(path)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Samples of a mono 16-bit WAV as float32 in [-1, 1), and its sample rate."""
    with wave.open(str(path), "rb") as handle:
        if handle.getsampwidth() != 2 or handle.getnchannels() != 1:
            raise ValueError(f"{path}: expected mono 16-bit PCM")
        frames = handle.readframes(handle.getnframes())
        rate = handle.getframerate()
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, rate
