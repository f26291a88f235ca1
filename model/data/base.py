"""The shape every training dataset takes: labelled fixed-length sequences, split by provenance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


def seeded_generator(*key: object) -> np.random.Generator:
    """A generator seeded by a hash of `key`: the same draws on every machine and Python."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Split:
    """One split: `inputs` (N, L, C) float32 at the dataset's sample rate, `targets` (N,) int64;
    `groups` (N,), where known, who made each item (a speaker), so that a validation can hold
    out whole groups as the test split does."""

    inputs: np.ndarray
    targets: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.inputs.ndim != 3:
            raise ValueError(f"inputs must be (N, L, C), got shape {self.inputs.shape}")
        if self.targets.shape != (self.inputs.shape[0],):
            raise ValueError("targets must hold one class index per sequence")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def head(self, count: int | None) -> Split:
        """The first `count` sequences (datasets order their items so a prefix stays balanced)."""
        if count is None or count >= len(self):
            return self
        groups = None if self.groups is None else self.groups[:count]
        return Split(self.inputs[:count], self.targets[:count], groups)


@dataclass(frozen=True)
class ExtraEvaluation:
    """A held-out set the model is also scored on, run at `rate` (session rate / model rate)."""

    split: Split
    rate: float
    description: str


@dataclass(frozen=True)
class Dataset:
    """Train and held-out test splits plus what a model trained on them must record."""

    name: str
    train: Split
    test: Split
    labels: list[str]
    sample_rate: float
    provenance: dict = field(default_factory=dict)
    extra_evaluations: dict[str, ExtraEvaluation] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.train.inputs.shape[2])

    def describe(self) -> dict:
        """JSON-ready summary for metrics.json: where the data came from and how it was split."""
        return {
            "dataset": self.name,
            "labels": list(self.labels),
            "sample_rate": self.sample_rate,
            "sequence_length": int(self.train.inputs.shape[1]),
            "channels": self.channels,
            "train_size": len(self.train),
            "test_size": len(self.test),
            **self.provenance,
            "extra_evaluations": {
                key: {"size": len(extra.split), "rate": extra.rate, "what": extra.description}
                for key, extra in self.extra_evaluations.items()
            },
        }
