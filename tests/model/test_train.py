"""Training: parameter groups, folded standardisation, seeded reproducibility, and the whole
`s4serve train` pipeline on a tiny slice of real data (espeak-ng -> train -> save -> load)."""

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from model.checkpoint import load_metrics, load_model
from model.config import ModelConfig
from model.data import load_dataset
from model.network import S4Network
from model.train import (
    SSM_PARAMETER_NAMES,
    RunConfig,
    TrainSettings,
    WeightAverage,
    channel_statistics,
    cosine_schedule,
    fit,
    fold_standardisation,
    parameter_groups,
)
from server.cli import app

TINY_MODEL = {"d_model": 8, "d_state": 4, "n_layers": 1}


def test_ssm_parameters_get_their_own_lr_and_no_decay():
    net = S4Network(ModelConfig(d_input=2, d_output=3, d_model=8, d_state=4, n_layers=2))
    settings = TrainSettings(lr=0.01, ssm_lr=0.001, weight_decay=0.1)
    groups = parameter_groups(net, settings)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())  # each exactly once
    names = {id(p): name for name, p in net.named_parameters()}
    ssm = [g for g in groups if g["lr"] == settings.ssm_lr]
    assert len(ssm) == 1 and ssm[0]["weight_decay"] == 0.0
    ssm_names = {names[id(p)].rsplit(".", 1)[-1] for p in ssm[0]["params"]}
    assert {"log_dt", "log_a_real", "a_imag", "B"} <= ssm_names <= set(SSM_PARAMETER_NAMES)


def test_folded_standardisation_lets_the_model_take_raw_input():
    torch.manual_seed(0)
    net = S4Network(ModelConfig(d_input=3, d_output=2, **TINY_MODEL)).eval()
    raw = torch.randn(2, 50, 3) * torch.tensor([5.0, 0.1, 30.0]) + torch.tensor([2.0, -1.0, 7.0])
    mean, std = np.array([2.0, -1.0, 7.0]), np.array([5.0, 0.1, 30.0])
    expected = net(((raw - torch.tensor(mean)) / torch.tensor(std)).float())
    fold_standardisation(net, mean, std)
    torch.testing.assert_close(net(raw), expected, rtol=1e-4, atol=1e-5)


def test_channel_statistics_are_over_all_samples():
    data = load_dataset("basicmotions", limit=8)
    mean, std = channel_statistics(data.train)
    flat = data.train.inputs.reshape(-1, 6)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-5)


def _tiny_fit(seed: int):
    data = load_dataset("basicmotions", limit=8)
    config = RunConfig(model=TINY_MODEL).model_config_for(data)
    settings = TrainSettings(seed=seed, epochs=2, batch_size=4, lr=0.01)
    return fit(config, data, settings, progress=False)


def test_time_budget_anneals_and_stops_training():
    steps_only = cosine_schedule(total_steps=100, warmup_steps=0)
    assert steps_only(0) == pytest.approx(1.0) and steps_only(50) == pytest.approx(0.5)
    half_time = cosine_schedule(100, 0, time_fraction=lambda: 0.5)
    assert half_time(10) == pytest.approx(0.5)  # time is further along than the steps
    assert half_time(90) == pytest.approx(steps_only(90))  # steps are further along than time
    data = load_dataset("basicmotions", limit=8)
    config = RunConfig(model=TINY_MODEL).model_config_for(data)
    settings = TrainSettings(epochs=3, batch_size=4, time_budget_s=1e-9)
    _, history = fit(config, data, settings, progress=False)
    assert history["steps"] == 1 and history["planned_steps"] == 6
    assert len(history["epoch_loss"]) == 1


def test_weight_average_follows_the_parameters_with_its_decay():
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, decay=0.5)
    history = [0.0]
    for value in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update()
        decay = min(0.5, (1 + average.updates) / (10 + average.updates))
        history.append(decay * history[-1] + (1 - decay) * value)
    average.copy_to_network()
    assert layer.weight[0, 0].item() == pytest.approx(history[-1])
    assert 8.0 < history[-1] < 10.0  # lags the last weights, by the decay's horizon


def test_training_with_an_average_saves_the_averaged_weights():
    data = load_dataset("basicmotions", limit=8)
    config = RunConfig(model=TINY_MODEL).model_config_for(data)
    last, _ = fit(config, data, TrainSettings(epochs=2, batch_size=4, lr=0.01), progress=False)
    averaged, _ = fit(config, data, TrainSettings(epochs=2, batch_size=4, lr=0.01, ema=0.9),
                      progress=False)
    # same seed, same steps: only what is saved differs
    changed = [name for name, value in last.state_dict().items()
               if not torch.equal(value, averaged.state_dict()[name])]
    assert changed
    assert torch.isfinite(averaged(torch.as_tensor(data.test.inputs[:2]))).all()


def test_training_is_reproducible_with_a_seed():
    (first, history_a), (second, history_b) = _tiny_fit(0), _tiny_fit(0)
    other, _ = _tiny_fit(1)
    for name, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[name], rtol=0, atol=0)
    assert history_a["epoch_loss"] == history_b["epoch_loss"]
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_run_config_fills_shape_and_metadata_from_the_dataset(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"name": "m", **TINY_MODEL}, "train": {"epochs": 3}}))
    run = RunConfig.from_file(path)
    config = run.model_config_for(load_dataset("basicmotions", limit=4))
    assert (config.d_input, config.d_output, config.sample_rate) == (6, 4, 10.0)
    assert config.labels == ["standing", "running", "walking", "badminton"]
    assert run.train.epochs == 3
    path.write_text(json.dumps({"model": {}, "train": {"epochs": 3, "typo": 1}}))
    with pytest.raises(ValueError, match="typo"):
        RunConfig.from_file(path)


def test_s4serve_train_generates_trains_saves_and_the_model_predicts(tmp_path):
    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "digits-tiny", **TINY_MODEL},
        "train": {"seed": 3, "epochs": 1, "batch_size": 5, "lr": 0.01},
    }))
    out, cache = tmp_path / "model", tmp_path / "cache"
    result = CliRunner().invoke(app, [
        "train", str(config), "--dataset", "espeak-digits", "--out", str(out),
        "--limit", "10", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output

    net = load_model(out)
    assert net.config.sample_rate == 16000.0 and net.config.labels[0] == "zero"
    metrics = load_metrics(out)
    assert metrics["training"]["command"].startswith("s4serve train")
    assert "--limit 10" in metrics["training"]["command"]
    assert metrics["data"]["train_size"] == metrics["data"]["test_size"] == 10
    assert set(metrics["baselines"]) >= {"nearest_neighbour_raw", "logistic_regression_raw"}
    assert metrics["test_8khz"]["rate"] == 0.5

    data = load_dataset("espeak-digits", limit=10, cache_dir=cache)
    logits, _ = net.predict(torch.as_tensor(data.test.inputs))
    predicted = logits[:, -1].argmax(-1).numpy()
    assert predicted.tolist() == metrics["test_predictions"]
    assert metrics["test_accuracy"] == pytest.approx(float((predicted == data.test.targets).mean()))
    # The streaming (recurrent) form gives the same final prediction as the conv view.
    streamed, _ = net.predict(torch.as_tensor(data.test.inputs[:2]), return_state=True)
    assert streamed[:, -1].argmax(-1).tolist() == predicted[:2].tolist()
