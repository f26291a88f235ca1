"""Placeholder until the 'convert' command lands; replaced by its owner."""

import typer


def register(app: typer.Typer) -> None:
    return None
