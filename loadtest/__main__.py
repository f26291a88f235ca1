"""`python -m loadtest`: the same commands as `s4serve loadtest`."""

from loadtest.cli import app

app()
