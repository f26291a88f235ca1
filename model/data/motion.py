"""BasicMotions (UEA archive) as shipped in the aeon wheel: smartwatch accelerometer + gyroscope.

Four students wore a smart watch while standing, walking, running and playing badminton, five
recordings each; every recording is 10 s of 3-axis accelerometer and 3-axis gyroscope sampled
once every tenth of a second (10 Hz, per the .ts file header), so each sequence is (100, 6).
The archive's own TRAIN/TEST split (40/40, 10 per class in each) is used unchanged. Loading
reads the files bundled with aeon directly, so it never touches the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.data.base import Dataset, ExtraEvaluation, Split

NAME = "basicmotions"
ARCHIVE_NAME = "BasicMotions"
SAMPLE_RATE_HZ = 10.0


def bundled_directory() -> Path:
    """Where the aeon wheel keeps its copy of BasicMotions."""
    import aeon.datasets

    return Path(aeon.datasets.__file__).parent / "data" / ARCHIVE_NAME


def class_interleaved_order(targets: np.ndarray) -> np.ndarray:
    """Indices that cycle through the classes (a, b, c, d, a, b, ...) so any prefix is balanced."""
    rank_in_class = np.zeros(len(targets), dtype=np.int64)
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        rank_in_class[members] = np.arange(len(members))
    return np.lexsort((targets, rank_in_class))


def _read_split(split: str, labels: list[str] | None) -> tuple[Split, list[str]]:
    from aeon.datasets import load_from_ts_file

    path = bundled_directory() / f"{ARCHIVE_NAME}_{split}.ts"
    series, names, meta = load_from_ts_file(str(path), return_meta_data=True)
    labels = labels or [str(value) for value in meta["class_values"]]
    targets = np.array([labels.index(str(name)) for name in names], dtype=np.int64)
    inputs = np.ascontiguousarray(np.transpose(series, (0, 2, 1)), dtype=np.float32)
    order = class_interleaved_order(targets)
    return Split(inputs[order], targets[order]), labels


def resampled(split: Split, up: int, down: int) -> Split:
    """The split at up/down times its rate: polyphase resampling with scipy's anti-aliasing
    FIR, as a device sampling at that rate would deliver it (approximately)."""
    from scipy.signal import resample_poly

    inputs = resample_poly(split.inputs.astype(np.float64), up, down, axis=1)
    return Split(np.ascontiguousarray(inputs, dtype=np.float32), split.targets)


def load(limit: int | None = None) -> Dataset:
    """BasicMotions with aeon's split; `limit` keeps the first (class-balanced) items per split.
    The test split is also offered at 20 Hz and 5 Hz, for models run with `rate` 2 and 0.5."""
    train, labels = _read_split("TRAIN", None)
    test, _labels = _read_split("TEST", labels)
    test = test.head(limit)
    extra = {
        f"test_{hz}hz": ExtraEvaluation(
            split=resampled(test, up, down), rate=up / down,
            description=f"test recordings resampled to {hz} Hz (scipy resample_poly), run at "
                        f"rate {up / down:g} (no retraining)")
        for hz, up, down in ((20, 2, 1), (5, 1, 2))
    }
    return Dataset(
        name=NAME,
        train=train.head(limit),
        test=test,
        labels=labels,
        sample_rate=SAMPLE_RATE_HZ,
        provenance={
            "source": f"{ARCHIVE_NAME}_{{TRAIN,TEST}}.ts bundled with aeon {_aeon_version()}",
            "split": "the archive's own TRAIN/TEST split",
            "channels": "3-axis accelerometer + 3-axis gyroscope (header names no dimension)",
        },
        extra_evaluations=extra,
    )


def _aeon_version() -> str:
    from importlib.metadata import version

    return version("aeon")
