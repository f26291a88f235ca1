"""`s4serve bench`: the benchmark suite (model, backends, server end to end) -> BENCHMARKS.md."""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    quick: Annotated[bool, typer.Option(help="Small sizes, seconds: a smoke test for CI.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Markdown report (default: a new file in the temp directory; "
                     "`make bench` writes BENCHMARKS.md)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option(help="Also write the raw results as JSON.")
    ] = None,
    section: Annotated[
        list[str] | None,
        typer.Option(help="model, backends, server, sessions, soak, conv, gpu "
                     "(repeatable; default all)."),
    ] = None,
) -> None:
    """Measure step/chunk/conv speed and accuracy, backends and the server; write a report."""
    from loadtest.bench.suite import SECTIONS, run_suite

    chosen = tuple(section or SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise typer.BadParameter(f"unknown section(s) {sorted(unknown)}; known: {SECTIONS}")
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="s4serve-bench-")) / "BENCHMARKS.md"
    command = "s4serve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_suite(
        quick, out, chosen, command, log=lambda m: typer.echo(m, err=True), json_out=json_out
    )
    failed = [name for name in chosen if "error" in result.get(name, {})]
    typer.echo(f"wrote {out}")
    if failed:
        typer.echo(f"sections that did not complete: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
