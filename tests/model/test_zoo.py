"""The shipped default models load, are small, and reproduce their stored held-out results."""

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_metrics, load_model
from model.data import load_dataset
from model.train import predictions

ZOO = Path(__file__).resolve().parents[2] / "model" / "zoo"
MAX_BYTES = 5 * 1024 * 1024


@pytest.mark.parametrize("name", ["motion", "digits"])
def test_shipped_model_is_small_and_documents_itself(name):
    directory = ZOO / name
    assert sum(f.stat().st_size for f in directory.iterdir()) <= MAX_BYTES
    net, metrics = load_model(directory), load_metrics(directory)
    assert net.config.name == name and net.config.task == "classification"
    assert net.config.sample_rate and net.config.labels
    assert metrics["training"]["command"].startswith("s4serve train configs/")
    assert metrics["data"]["test_size"] == len(metrics["test_predictions"])
    assert set(metrics["baselines"]) >= {"nearest_neighbour_raw", "logistic_regression_raw"}


def test_motion_reproduces_its_held_out_accuracy():
    net, metrics = load_model(ZOO / "motion"), load_metrics(ZOO / "motion")
    data = load_dataset(metrics["data"]["dataset"])
    predicted = predictions(net, data.test)
    assert predicted.tolist() == metrics["test_predictions"]
    assert float((predicted == data.test.targets).mean()) == metrics["test_accuracy"]
    # Streaming the same recordings sample by sample ends on the same predictions.
    streamed, _ = net.predict(torch.as_tensor(data.test.inputs[:8]), return_state=True)
    assert streamed[:, -1].argmax(-1).tolist() == predicted[:8].tolist()


def test_digits_reproduces_stored_predictions_on_a_held_out_subset(tmp_path):
    net, metrics = load_model(ZOO / "digits"), load_metrics(ZOO / "digits")
    count = 20  # two test voices, all ten digits: the full 480-clip set is too slow for CI
    data = load_dataset(metrics["data"]["dataset"], limit=count, cache_dir=tmp_path)
    assert predictions(net, data.test).tolist() == metrics["test_predictions"][:count]
    low = data.extra_evaluations["test_8khz"]
    stored_low = metrics["test_8khz"]["predictions"][:count]
    assert predictions(net, low.split, rate=low.rate).tolist() == stored_low
    assert np.array_equal(data.test.targets, np.arange(count) % 10)
