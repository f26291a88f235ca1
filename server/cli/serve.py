"""`s4serve serve`: run the HTTP + WebSocket server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.settings import Settings


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def _default(name: str) -> str:
    """The setting's default, for the help text (the options default to None so that the
    environment applies when a flag is absent)."""
    return f" (default: {Settings.model_fields[name].default})"


def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on." + _default("host"))
                    ] = None,
    port: Annotated[int | None, typer.Option(help="TCP port." + _default("port"))] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option("--model", "-m", help="Model directory (repeatable). Default: the zoo."),
    ] = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda or cuda:N." + _default("device"))] = None,
    backend: Annotated[str | None, typer.Option(
        help="torch, torch-inductor or onnx, for every model." + _default("backend"))] = None,
    max_sessions: Annotated[
        int | None, typer.Option(help="Concurrent sessions (per worker)."
                                 + _default("max_sessions"))
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Server processes sharing the port (0: one per core it "
                                 "may use)." + _default("workers"))
    ] = None,
    snapshot_dir: Annotated[
        Path | None, typer.Option(help="Where dropped sessions wait to be resumed.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(
        help="debug, info, warning, error." + _default("log_level"))] = None,
    json_logs: Annotated[bool | None, typer.Option(help="One JSON object per log line.")] = None,
) -> None:
    """Serve models: streaming sessions over WebSocket, whole sequences over HTTP.

    Every S4SERVE_* environment variable is a setting too (docs/server.md); flags win.
    """
    flags = {
        "host": host, "port": port, "models": model or None, "device": device,
        "backend": backend, "max_sessions": max_sessions, "workers": workers,
        "snapshot_dir": snapshot_dir,
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
    """Serve until SIGTERM/SIGINT: one process, or `workers` supervised processes."""
    from server.logs import configure
    from server.workers import cpu_cores, supervise

    workers = settings.workers or cpu_cores()
    if workers == 1:
        run_one(settings)
        return
    configure(settings.log_level, settings.json_logs)
    try:
        status = supervise(settings, workers)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if status:
        raise typer.Exit(status)


def run_one(settings: Settings, sockets: list | None = None) -> None:
    """One server process: uvicorn with the app and a SIGTERM drain."""
    from server.app import DrainingServer, create_app, uvicorn_config
    from server.logs import configure

    configure(settings.log_level, settings.json_logs)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app.state.runtime)
    server.run(sockets=sockets)
    if app.state.runtime.load_error:
        raise SystemExit(1)
