"""Loading the configured models: one backend and one slot pool each."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from server.backends.base import ModelBackend, ModelInfo, load_backend
from server.settings import Settings
from server.slots import SlotPool

log = logging.getLogger("s4serve.models")


@dataclass
class LoadedModel:
    backend: ModelBackend
    pool: SlotPool

    @property
    def info(self) -> ModelInfo:
        return self.backend.info


def model_name(model_dir: Path) -> str:
    """The name a directory's model is served under: its config's `name`, else the folder."""
    try:
        name = json.loads((Path(model_dir) / "config.json").read_text()).get("name")
    except (OSError, ValueError):
        name = None
    return name or Path(model_dir).name


def load_models(settings: Settings) -> dict[str, LoadedModel]:
    """Load, place and warm every configured model. Raises on any failure."""
    loaded: dict[str, LoadedModel] = {}
    for model_dir in settings.model_dirs():
        kind = settings.backend_for(model_name(model_dir))
        backend = load_backend(kind, model_dir, settings.device, settings.max_rates,
                               settings.step_compiler, settings.compile_cache,
                               settings.onnx_cache, settings.onnx_threads)
        name = backend.info.name
        if name in loaded:
            raise ValueError(f"two model directories are both named {name!r}")
        backend.warmup()
        loaded[name] = LoadedModel(backend, SlotPool(backend, settings.max_sessions))
        log.info(
            "loaded model %s version %s (%s on %s, %d state bytes per session)",
            name, backend.info.version, kind, backend.info.device, backend.info.state_bytes,
        )
    return loaded
