"""`s4serve serve`: run the HTTP + WebSocket server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.settings import Settings


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option("--model", "-m", help="Model directory (repeatable). Default: the zoo."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    backend: Annotated[str | None, typer.Option(help="torch or onnx, for every model.")] = None,
    max_sessions: Annotated[int | None, typer.Option(help="Concurrent sessions.")] = None,
    snapshot_dir: Annotated[
        Path | None, typer.Option(help="Where dropped sessions wait to be resumed.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    json_logs: Annotated[bool | None, typer.Option(help="One JSON object per log line.")] = None,
) -> None:
    """Serve models: streaming sessions over WebSocket, whole sequences over HTTP.

    Every S4SERVE_* environment variable is a setting too (docs/server.md); flags win.
    """
    flags = {
        "host": host, "port": port, "models": model or None, "device": device,
        "backend": backend, "max_sessions": max_sessions, "snapshot_dir": snapshot_dir,
        "log_level": log_level, "json_logs": json_logs,
    }
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    model_dirs = settings.model_dirs()
    if not model_dirs:
        typer.echo(
            f"no models to serve: {settings.zoo_dir} holds no model directories "
            "(each with a config.json). Pass --model PATH or set S4SERVE_MODELS.",
            err=True,
        )
        raise typer.Exit(2)
    missing = [p for p in model_dirs if not (Path(p) / "config.json").is_file()]
    if missing:
        typer.echo(f"not a model directory (no config.json): {', '.join(map(str, missing))}",
                   err=True)
        raise typer.Exit(2)
    run(settings)


def run(settings: Settings) -> None:
    """Start uvicorn with the app and a SIGTERM drain; returns when the server stops."""
    from server.app import DrainingServer, create_app, uvicorn_config
    from server.logs import configure

    configure(settings.log_level, settings.json_logs)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app.state.runtime)
    server.run()
    if app.state.runtime.load_error:
        raise typer.Exit(1)
