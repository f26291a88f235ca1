"""Training a causal S4 classifier on a registered dataset, and scoring it on held-out data.

A run config (JSON or YAML) has two sections: `model`, the ModelConfig fields (the dataset
fills in d_input, d_output, labels and sample_rate), and `train`, the TrainSettings below.
Inputs are standardised per channel with training-set statistics while training; at the end
the standardisation is folded into the linear encoder, so the saved model takes raw samples.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from model.augment import Augment, augment
from model.config import ModelConfig
from model.data.base import Dataset, Split
from model.network import S4Network

# Parameters of the continuous-time system (dt, A, B and S4's low-rank P): trained with a
# smaller learning rate and no weight decay, as in the S4 papers; C and D are ordinary weights.
SSM_PARAMETER_NAMES = ("log_dt", "log_a_real", "a_imag", "log_lam_real", "lam_imag", "B", "P")


class TrainSettings(BaseModel):
    """Optimisation settings: AdamW, cosine learning-rate decay after a linear warm-up."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(4e-3, gt=0)
    ssm_lr: float = Field(1e-3, gt=0, description="learning rate of dt, A, B (and P)")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    eval_batch_size: int = Field(64, ge=1)
    ema: float | None = Field(
        None, ge=0, lt=1, description="keep an exponential moving average of the weights with "
        "this decay and save it instead of the last step's weights")
    augment: Augment | None = Field(None, description="random changes to training batches")
    time_budget_s: float | None = Field(
        None, gt=0, description="wall-clock limit for the optimisation steps: the schedule "
        "anneals by whichever of steps or time is further along, and training stops when it "
        "runs out (runs with a budget are not bit-reproducible)")


class RunConfig(BaseModel):
    """A training config file: the network (ModelConfig fields) and how to train it."""

    model_config = ConfigDict(extra="forbid")

    model: dict = Field(default_factory=dict)
    data: dict = Field(default_factory=dict, description="options of the dataset's loader")
    train: TrainSettings = Field(default_factory=TrainSettings)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data or {})

    def model_config_for(self, dataset: Dataset) -> ModelConfig:
        """The architecture with the dataset's shape and metadata filled in."""
        return ModelConfig.model_validate({
            **self.model,
            "task": "classification",
            "d_input": dataset.channels,
            "d_output": len(dataset.labels),
            "labels": list(dataset.labels),
            "sample_rate": dataset.sample_rate,
        })


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def parameter_groups(net: nn.Module, settings: TrainSettings) -> list[dict]:
    """AdamW groups: SSM parameters (smaller lr, no decay), other matrices, biases and norms."""
    ssm, decay, no_decay = [], [], []
    for name, param in net.named_parameters():
        if name.rsplit(".", 1)[-1] in SSM_PARAMETER_NAMES:
            ssm.append(param)
        elif param.dim() >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "lr": settings.lr, "weight_decay": settings.weight_decay},
        {"params": no_decay, "lr": settings.lr, "weight_decay": 0.0},
        {"params": ssm, "lr": settings.ssm_lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def channel_statistics(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over every training sample."""
    flat = split.inputs.reshape(-1, split.inputs.shape[-1]).astype(np.float64)
    return flat.mean(axis=0), np.maximum(flat.std(axis=0), 1e-8)


@torch.no_grad()
def fold_standardisation(net: S4Network, mean: np.ndarray, std: np.ndarray) -> None:
    """Make encoder(x) equal what encoder((x - mean) / std) was, so the model takes raw input."""
    encoder = net.encoder
    if not isinstance(encoder, nn.Linear):
        raise ValueError("folding input standardisation needs a linear encoder")
    scale = torch.as_tensor(1.0 / std, dtype=torch.float64)
    shift = torch.as_tensor(mean, dtype=torch.float64)
    weight = encoder.weight.to(torch.float64) * scale[None, :]
    encoder.bias.copy_((encoder.bias.to(torch.float64) - weight @ shift).to(encoder.bias.dtype))
    encoder.weight.copy_(weight.to(encoder.weight.dtype))


def batches(split: Split, batch_size: int, generator: torch.Generator | None,
            mean: np.ndarray | None = None, std: np.ndarray | None = None,
            change: Callable[[np.ndarray], np.ndarray] | None = None,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches in a seeded random order (or in order without a generator); `change`
    (augmentation) sees raw samples, before standardisation."""
    order = (torch.randperm(len(split), generator=generator) if generator is not None
             else torch.arange(len(split)))
    for start in range(0, len(split), batch_size):
        index = order[start:start + batch_size].numpy()
        inputs = split.inputs[index]
        if change is not None:
            inputs = change(inputs)
        if mean is not None and std is not None:
            inputs = (inputs - mean) / std
        yield (torch.as_tensor(inputs, dtype=torch.float32),
               torch.as_tensor(split.targets[index]))


@torch.no_grad()
def final_logits(net: S4Network, split: Split, rate: float = 1.0,
                 batch_size: int = 64) -> torch.Tensor:
    """Logits at each sequence's last sample (the causal head's full-sequence prediction)."""
    was_training = net.training
    net.eval()
    outputs = [net.final(inputs, rate=rate)
               for inputs, _ in batches(split, batch_size, generator=None)]
    net.train(was_training)
    return torch.cat(outputs)


def predictions(net: S4Network, split: Split, rate: float = 1.0,
                batch_size: int = 64) -> np.ndarray:
    """Predicted class index per sequence (argmax of the final-sample logits)."""
    return final_logits(net, split, rate, batch_size).argmax(dim=-1).numpy()


def accuracy(net: S4Network, split: Split, rate: float = 1.0, batch_size: int = 64) -> float:
    return float((predictions(net, split, rate, batch_size) == split.targets).mean())


def cosine_schedule(total_steps: int, warmup_steps: int,
                    time_fraction: Callable[[], float] | None = None):
    """Linear warm-up, then cosine decay over the steps (or the time budget, if further on)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if time_fraction is not None:
            progress = max(progress, time_fraction())
        return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))

    return factor


class WeightAverage:
    """An exponential moving average of a network's parameters. Early on the decay is capped at
    (1 + t) / (10 + t) so the average is not dominated by the random initial weights."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]

    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_network(self) -> None:
        for param, average in zip(self.params, self.average, strict=True):
            param.copy_(average)


def fit(config: ModelConfig, dataset: Dataset, settings: TrainSettings,
        progress: bool = True) -> tuple[S4Network, dict]:
    """Train from scratch with cross-entropy on the final-sample logits; returns net, history."""
    seed_everything(settings.seed)
    net = S4Network(config).train()
    optimizer = torch.optim.AdamW(parameter_groups(net, settings))
    steps_per_epoch = -(-len(dataset.train) // settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    started = time.perf_counter()
    budget = settings.time_budget_s

    def time_fraction() -> float:
        return (time.perf_counter() - started) / budget if budget else 0.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total_steps, settings.warmup_steps,
                                   time_fraction if budget else None))
    mean, std = channel_statistics(dataset.train)
    order = torch.Generator().manual_seed(settings.seed)
    change = None
    if settings.augment is not None:
        rng = np.random.default_rng(settings.seed)
        def change(x: np.ndarray) -> np.ndarray:
            return augment(x, settings.augment, dataset.sample_rate, rng)
    average = WeightAverage(net, settings.ema) if settings.ema else None
    losses: list[float] = []
    steps_done = 0
    with tqdm(total=total_steps, desc=f"train {config.name}", disable=not progress,
              unit="step") as bar:
        for epoch in range(settings.epochs):
            epoch_losses = []
            for inputs, targets in batches(dataset.train, settings.batch_size, order, mean, std,
                                           change):
                loss = F.cross_entropy(net.final(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    nn.utils.clip_grad_norm_(net.parameters(), settings.grad_clip)
                optimizer.step()
                scheduler.step()
                if average is not None:
                    average.update()
                epoch_losses.append(loss.item())
                steps_done += 1
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                bar.update()
                if time_fraction() >= 1.0:
                    break
            losses.append(float(np.mean(epoch_losses)))
            if time_fraction() >= 1.0:
                break
    if average is not None:
        average.copy_to_network()
    fold_standardisation(net, mean, std)
    net.eval()
    history = {"epoch_loss": losses, "steps": steps_done, "planned_steps": total_steps,
               "seconds": round(time.perf_counter() - started, 1)}
    return net, history


def evaluate(net: S4Network, dataset: Dataset, batch_size: int = 64) -> dict:
    """Held-out accuracy (final-sample logits) on the test split and every extra evaluation."""
    # Training accuracy on a test-sized prefix: enough to show the fit, cheap on long audio.
    train_prefix = dataset.train.head(max(len(dataset.test), 1))
    # Per-item test predictions are stored so a check can re-score any subset cheaply.
    test_predicted = predictions(net, dataset.test, 1.0, batch_size)
    results = {"test_accuracy": float((test_predicted == dataset.test.targets).mean()),
               "train_accuracy": accuracy(net, train_prefix, 1.0, batch_size),
               "train_accuracy_items": len(train_prefix)}
    for key, extra in dataset.extra_evaluations.items():
        extra_predicted = predictions(net, extra.split, extra.rate, batch_size)
        results[key] = {"accuracy": float((extra_predicted == extra.split.targets).mean()),
                        "rate": extra.rate, "what": extra.description,
                        "predictions": extra_predicted.tolist()}
    results["test_predictions"] = test_predicted.tolist()
    return results


def rescore(model_dir: str | Path, dataset_name: str, write: bool = False,
             batch_size: int = 64, dataset_options: dict | None = None) -> dict:
    """Score a saved model again on its dataset (held-out split and every extra evaluation);
    with `write`, the results replace those in its metrics.json (training facts are kept)."""
    from model.checkpoint import load_model
    from model.data import load_dataset

    directory = Path(model_dir)
    dataset = load_dataset(dataset_name, **(dataset_options or {}))
    results = evaluate(load_model(directory), dataset, batch_size)
    if write:
        path = directory / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        metrics.update(results)
        path.write_text(json.dumps(metrics, indent=2) + "\n")
    return results


def train_and_save(config_path: str | Path, dataset_name: str, out: str | Path, *,
                   seed: int | None = None, epochs: int | None = None, limit: int | None = None,
                   command: str = "", baselines: bool = True, progress: bool = True,
                   dataset_options: dict | None = None) -> dict:
    """The whole `s4serve train` run: load data, train, evaluate, save model + metrics.json."""
    from model.baselines import evaluate_baselines
    from model.checkpoint import save_model
    from model.data import load_dataset

    run = RunConfig.from_file(config_path)
    overrides = {key: value for key, value in (("seed", seed), ("epochs", epochs))
                 if value is not None}
    settings = run.train.model_copy(update=overrides)
    settings = TrainSettings.model_validate(settings.model_dump())
    dataset = load_dataset(dataset_name, limit=limit, **{**run.data, **(dataset_options or {})})
    config = run.model_config_for(dataset)
    net, history = fit(config, dataset, settings, progress=progress)
    metrics = {
        "task": "classification",
        "accuracy_is": "argmax of the causal head's logits at each sequence's last sample",
        **evaluate(net, dataset, settings.eval_batch_size),
        "baselines": evaluate_baselines(dataset, settings.seed) if baselines else {},
        "data": {**dataset.describe(), "limit": limit},
        "training": {
            "command": command,
            "config_file": str(config_path),
            "data_options": run.data,
            "settings": settings.model_dump(),
            "parameters": sum(p.numel() for p in net.parameters()),
            "torch": torch.__version__,
            **history,
        },
    }
    save_model(net, out, metrics=metrics)
    return metrics
