"""`s4serve loadtest ...`: the load tester's commands (see loadtest/cli.py, docs/loadtest.md)."""

import typer


def register(app: typer.Typer) -> None:
    from loadtest.cli import app as loadtest_app

    app.add_typer(loadtest_app, name="loadtest")
