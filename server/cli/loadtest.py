"""Placeholder until the 'loadtest' command lands; replaced by its owner."""

import typer


def register(app: typer.Typer) -> None:
    return None
