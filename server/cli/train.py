"""`s4serve train`: train a causal S4 classifier on a registered dataset, save a model directory."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer


def train(
    config: Path = typer.Argument(..., exists=True, dir_okay=False,
                                  help="training config (JSON or YAML): `model` and `train`"),
    dataset: str = typer.Option(..., "--dataset", help="dataset name, e.g. basicmotions or "
                                "espeak-digits"),
    out: Path = typer.Option(..., "--out", help="model directory to write"),
    seed: int | None = typer.Option(None, help="override the config's seed"),
    epochs: int | None = typer.Option(None, help="override the config's epochs"),
    limit: int | None = typer.Option(None, min=1,
                                     help="use only the first N items of each split"),
    cache_dir: Path | None = typer.Option(None, help="where generated data is cached "
                                          "(espeak-digits; default ~/.cache/s4serve/digits)"),
    baselines: bool = typer.Option(True, help="also score the baselines on the same split"),
    force: bool = typer.Option(False, "--force", help="write into --out even if it is not "
                               "empty (replacing a model there)"),
) -> None:
    """Train from CONFIG on --dataset and save weights, config.json and metrics.json in --out."""
    from model.checkpoint import check_output_directory
    from model.train import train_and_save

    check_output_directory(out, force)
    _known_dataset(dataset)
    options = {"cache_dir": cache_dir} if cache_dir else {}
    command = _command_line(config, dataset, out, seed, epochs, limit)
    metrics = train_and_save(config, dataset, out, seed=seed, epochs=epochs, limit=limit,
                             command=command, baselines=baselines, dataset_options=options)
    typer.echo(f"held-out accuracy {metrics['test_accuracy']:.3f} "
               f"({metrics['data']['test_size']} sequences); model written to {out}")
    _echo_extra_evaluations(metrics)
    for name, result in metrics["baselines"].items():
        typer.echo(f"baseline {name}: accuracy {result['accuracy']:.3f}")


def evaluate(
    model_dir: Path = typer.Argument(..., exists=True, file_okay=False,
                                     help="a model directory"),
    dataset: str = typer.Option(..., "--dataset", help="the dataset it was trained on"),
    write: bool = typer.Option(False, help="store the results in its metrics.json"),
    cache_dir: Path | None = typer.Option(None, help="where generated data is cached"),
) -> None:
    """Score a saved model on the held-out split and every extra evaluation (other rates)."""
    from model.checkpoint import load_model
    from model.train import rescore

    load_model(model_dir)  # not a model: said before the data is loaded (or synthesised)
    _known_dataset(dataset)
    options = {"cache_dir": cache_dir} if cache_dir else {}
    results = rescore(model_dir, dataset, write=write, dataset_options=options)
    typer.echo(f"held-out accuracy {results['test_accuracy']:.3f}")
    _echo_extra_evaluations(results)


def refit_head(
    model_dir: Path = typer.Argument(..., exists=True, file_okay=False,
                                     help="a trained classifier's model directory"),
    dataset: str = typer.Option(..., "--dataset", help="the dataset it was trained on"),
    out: Path = typer.Option(..., "--out", help="model directory to write"),
    version: str | None = typer.Option(None, help="the new model's version (default: "
                                       "the old one's)"),
    force: bool = typer.Option(False, "--force", help="write into --out even if not empty"),
) -> None:
    """Fit a classifier's decoder again (logistic regression on its frozen features, C by
    cross-validation on the training split, grouped by speaker where known), then score it
    and save it with its metrics (docs/models.md)."""
    from model.checkpoint import check_output_directory, load_metrics, load_model, save_model
    from model.data import load_dataset
    from model.refit import refit_decoder
    from model.train import evaluate as score

    check_output_directory(out, force)
    net = load_model(model_dir)
    _known_dataset(dataset)
    metrics = load_metrics(model_dir) or {}
    options = metrics.get("training", {}).get("data_options", {})
    data = load_dataset(dataset, **options)
    refit = refit_decoder(net, data.train)
    if version is not None:
        net.config = net.config.model_copy(update={"version": version})
    results = score(net, data)
    metrics.update(results)
    metrics["head_refit"] = {**refit, "from": str(model_dir), "command": shlex.join(
        ["s4serve", "refit-head", str(model_dir), "--dataset", dataset, "--out", str(out)]
        + (["--version", version] if version else []))}
    save_model(net, out, metrics=metrics)
    typer.echo(f"C {refit['C']} (cross-validation {refit['cv_accuracy']}); held-out accuracy "
               f"{results['test_accuracy']:.3f}; model written to {out}")
    _echo_extra_evaluations(results)


def _known_dataset(name: str) -> None:
    from model.data import LOADERS

    if name not in LOADERS:
        raise typer.BadParameter(f"unknown dataset {name!r}; known: "
                                 f"{', '.join(sorted(LOADERS))}", param_hint="--dataset")


def _echo_extra_evaluations(results: dict) -> None:
    """The accuracy of every extra evaluation (other rates) in `results`."""
    for key, value in results.items():
        if isinstance(value, dict) and "rate" in value:
            typer.echo(f"{key}: accuracy {value['accuracy']:.3f} at rate {value['rate']}")


def _command_line(config: Path, dataset: str, out: Path, seed: int | None, epochs: int | None,
                  limit: int | None) -> str:
    """The command that reproduces this run (data caching options do not change the result)."""
    words = ["s4serve", "train", str(config), "--dataset", dataset, "--out", str(out)]
    for flag, value in (("--seed", seed), ("--epochs", epochs), ("--limit", limit)):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("refit-head")(refit_head)
