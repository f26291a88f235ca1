"""`s4serve import official ...` and `s4serve export onnx ...`: checkpoints in and graphs out."""

from __future__ import annotations

from pathlib import Path

import typer

from model.checkpoint import save_model

import_app = typer.Typer(help="Import checkpoints made elsewhere into s4serve model directories.",
                         no_args_is_help=True)
export_app = typer.Typer(help="Export a model directory to other runtimes.",
                         no_args_is_help=True)


@import_app.command("official")
def import_official_cmd(
    config: Path = typer.Option(..., "--config", exists=True, dir_okay=False,
                                help="JSON with the constructor arguments (fixture layout)"),
    weights: Path = typer.Option(..., "--weights", exists=True, dir_okay=False,
                                 help="state dict .pt (plain or Lightning-style)"),
    out: Path = typer.Option(..., "--out", help="model directory to write"),
    name: str | None = typer.Option(None, "--name", help="model name (default: the config's "
                                    "`case`, else the weights file's name)"),
    force: bool = typer.Option(False, "--force", help="write into --out even if it is not empty"),
) -> None:
    """Convert a state-spaces/s4 checkpoint (S4Block diag/dplr, minimal S4D, example.py)."""
    from model.checkpoint import check_output_directory
    from model.official import OfficialImportError, import_official

    check_output_directory(out, force)
    try:
        net = import_official(config, weights, name=name)
    except (OfficialImportError, KeyError) as exc:
        typer.secho(f"error: cannot import {weights}: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
    save_model(net, out, metrics={"imported_from": {"config": str(config),
                                                    "weights": str(weights)}})
    cfg = net.config
    typer.echo(f"wrote {out}: {cfg.name} ({cfg.layer}, {cfg.task}, d_input={cfg.d_input}, "
               f"d_output={cfg.d_output}, {cfg.n_layers} layer(s), d_state={cfg.d_state})")


@export_app.command("onnx")
def export_onnx_cmd(
    model_dir: Path = typer.Argument(..., exists=True, file_okay=False,
                                     help="the model directory to export"),
    out: Path = typer.Option(..., "--out", help="directory for step.onnx, chunk.onnx and "
                             "manifest.json (a previous export there is replaced)"),
    rate: float = typer.Option(1.0, "--rate", help="session rate / model rate baked in"),
    chunk: int | None = typer.Option(None, "--chunk", min=1, help="block length T of "
                                     "chunk.onnx (default: the model's chunk_max, at most 64; "
                                     "a power of two for S4)"),
    force: bool = typer.Option(False, "--force", help="write into --out even if it holds "
                               "other files"),
) -> None:
    """Write the recurrent step and chunk graphs (single files, dynamic batch)."""
    from model.checkpoint import check_output_directory

    try:
        from model.onnx_export import export_onnx
    except ImportError as exc:
        raise typer.BadParameter(f"exporting needs the onnx extra ({exc.name} is missing): "
                                 "pip install 's4serve[onnx]'") from None
    previous = {p.name for p in out.glob("chunk*.onnx")} | {"step.onnx", "manifest.json"}
    check_output_directory(out, force, frozenset(previous))
    paths = export_onnx(model_dir, out, rate=rate, chunk=chunk)
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")
    app.add_typer(export_app, name="export")
