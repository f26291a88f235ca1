"""A real uvicorn server on a free port, in a thread, with small real models."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from loadtest.processes import READY_TIMEOUT_S
from model.checkpoint import save_model
from model.config import ModelConfig
from model.network import S4Network
from server.app import DrainingServer, create_app, uvicorn_config
from server.settings import Settings

# Two small models: a multichannel S4D sequence model and an S4 (DPLR) classifier.
MODEL_CONFIGS = {
    "seq": dict(task="sequence", layer="s4d", d_input=2, d_output=3, d_model=16, n_layers=2,
                d_state=8, sample_rate=100.0),
    "cls": dict(task="classification", layer="s4", d_input=1, d_output=3, d_model=16,
                n_layers=2, d_state=8, labels=["low", "mid", "high"], sample_rate=16000.0),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for seed, (name, options) in enumerate(MODEL_CONFIGS.items()):
        torch.manual_seed(seed)
        dirs[name] = save_model(S4Network(ModelConfig(name=name, **options)), root / name)
    return dirs


class ServerThread:
    """uvicorn.Server running the app in a background thread."""

    def __init__(self, settings: Settings, **uvicorn_options) -> None:
        self.app = create_app(settings)
        self.runtime = self.app.state.runtime
        self.server = DrainingServer(uvicorn_config(self.app, settings, **uvicorn_options),
                                     self.runtime)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.url = f"http://{settings.host}:{settings.port}"
        self.ws_url = f"ws://{settings.host}:{settings.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        # a cold start compiles each model's step (tens of seconds on a loaded 2-core box)
        deadline = time.monotonic() + READY_TIMEOUT_S
        keys = self.runtime.settings.api_keys
        headers = {"authorization": f"Bearer {keys[0]}"} if keys else {}
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", headers=headers, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_settings(model_dirs: dict[str, Path], tmp_path: Path, **overrides) -> Settings:
    options = dict(
        host="127.0.0.1", port=free_port(), models=list(model_dirs.values()),
        snapshot_dir=tmp_path / "sessions", max_sessions=300,
    )
    options.update(overrides)
    return Settings(**options)


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory) -> Iterator[ServerThread]:
    settings = make_settings(model_dirs, tmp_path_factory.mktemp("srv"))
    with ServerThread(settings) as running:
        yield running
