"""The `s4serve` command line: one module per command group, wired together here."""

import pickle

import typer
from pydantic import ValidationError

from loadtest.config import one_line
from server.cli import bench, convert, loadtest, serve, stream, train

app = typer.Typer(
    name="s4serve",
    help="Serve S4 / S4D state-space models: stream over WebSocket, batch over HTTP.",
    no_args_is_help=True,
    add_completion=False,
)

for _module in (serve, stream, train, convert, bench, loadtest):
    _module.register(app)


def main() -> None:
    """The console command. A user's mistake (a directory that is no model, a config that is
    not JSON or not valid, an option out of range) is one line on stderr and exit status 2,
    not a traceback."""
    try:
        app()
    except ValidationError as exc:  # settings from options or the environment
        typer.secho(f"error: {one_line(exc)}", err=True, fg="red")
        raise SystemExit(2) from None
    except (ValueError, OSError, pickle.UnpicklingError) as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise SystemExit(2) from None
