"""The `s4serve` command line: one module per command group, wired together here."""

import typer

from server.cli import bench, convert, loadtest, serve, stream, train

app = typer.Typer(
    name="s4serve",
    help="Serve S4 / S4D state-space models: stream over WebSocket, batch over HTTP.",
    no_args_is_help=True,
    add_completion=False,
)

for _module in (serve, stream, train, convert, bench, loadtest):
    _module.register(app)
