"""A classifier's decoder fitted again on frozen features (model/refit.py): the network keeps
its shape and every view agrees; cross-validation holds out whole groups when there are
groups; `s4serve refit-head` writes a scored model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model.checkpoint import load_model, save_model
from model.data import load_dataset
from model.data.base import Split
from model.refit import pooled_features, refit_decoder
from model.train import RunConfig, TrainSettings, fit
from server.cli import app


@pytest.fixture(scope="module")
def trained():
    data = load_dataset("basicmotions", limit=24)
    config = RunConfig(model={"d_model": 8, "d_state": 4, "n_layers": 1}).model_config_for(data)
    net, _ = fit(config, data, TrainSettings(epochs=2, batch_size=8, lr=0.01), progress=False)
    return net, data


def test_the_refitted_decoder_is_what_every_view_applies(trained):
    net, data = trained
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = refit_decoder(net, data.train, c_grid=(0.1, 1.0), folds=3)
    after = net.state_dict()
    assert report["C"] in (0.1, 1.0) and set(report["cv_accuracy"]) == {"0.1", "1.0"}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"decoder.weight", "decoder.bias"}
    u = torch.as_tensor(data.test.inputs[:3])  # (3, L, C)
    features = pooled_features(net, Split(data.test.inputs[:3], data.test.targets[:3]))
    logits = features @ after["decoder.weight"].double().numpy().T + after["decoder.bias"].numpy()
    with torch.no_grad():
        np.testing.assert_allclose(net.final(u).numpy(), logits, atol=1e-4)
        np.testing.assert_allclose(net(u)[:, -1].numpy(), logits, atol=1e-4)  # conv view
        rec = net.to_recurrent()
        y, _ = rec.chunk(u, rec.initial_state(3))  # the streaming view
    np.testing.assert_allclose(y[:, -1].numpy(), logits, atol=1e-4)


def test_cross_validation_holds_out_whole_groups(trained, monkeypatch):
    import sklearn.model_selection as selection

    net, data = trained
    groups = np.arange(len(data.train)) % 4  # four "speakers"
    seen = []
    real = selection.GroupKFold.split

    def recorded(self, x, y, g):
        for train_rows, held_out in real(self, x, y, g):
            seen.append((set(g[train_rows]), set(g[held_out])))
            yield train_rows, held_out

    monkeypatch.setattr(selection.GroupKFold, "split", recorded)
    report = refit_decoder(net, Split(data.train.inputs, data.train.targets, groups),
                           c_grid=(1.0,), folds=4)
    assert report["grouped_by"] and len(seen) == 4
    assert all(not (kept & out) for kept, out in seen)


def test_refit_head_command_writes_a_scored_model(trained, tmp_path):
    net, _ = trained
    save_model(net, tmp_path / "m", metrics={"training": {"data_options": {"limit": 24}}})
    result = CliRunner().invoke(app, ["refit-head", str(tmp_path / "m"), "--dataset",
                                      "basicmotions", "--out", str(tmp_path / "r"),
                                      "--version", "1.1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["head_refit"]["C"] in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    assert len(metrics["test_predictions"]) == 24  # the data options it was trained with
    assert load_model(tmp_path / "r").config.version == "1.1"
