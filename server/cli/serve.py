"""Placeholder until the 'serve' command lands; replaced by its owner."""

import typer


def register(app: typer.Typer) -> None:
    return None
