"""Training datasets by name. Loading reads bundled files or synthesises audio, not at import."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from model.data import digits, motion
from model.data.base import Dataset, ExtraEvaluation, Split

LOADERS: dict[str, Callable[..., Dataset]] = {
    motion.NAME: motion.load,
    digits.NAME: digits.load,
}


def load_dataset(name: str, **options: object) -> Dataset:
    """Load a registered dataset; options (limit, cache_dir, ...) go to its loader, and one it
    does not take is an error (a mistyped `data:` key in a training config must not be lost)."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(LOADERS))}") from None
    accepted = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(accepted)}")
    return loader(**options)


__all__ = ["LOADERS", "Dataset", "ExtraEvaluation", "Split", "load_dataset"]
