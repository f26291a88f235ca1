import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_model, save_model
from model.network import check_input
from tests.model.conftest import perturbed_network


def test_round_trip_keeps_outputs(tmp_path):
    net = perturbed_network(layer="s4", task="classification", labels=list("abcde"))
    loaded = load_model(save_model(net, tmp_path / "m", metrics={"accuracy": 0.5}))
    u = torch.randn(2, 50, 3)
    with torch.no_grad():
        assert torch.equal(net(u), loaded(u))
    assert loaded.config == net.config


def test_config_that_does_not_match_weights_names_the_tensor(tmp_path):
    save_model(perturbed_network(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["d_state"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.layer\.\w+ has shape"):
        load_model(tmp_path / "m")


def test_missing_tensor_and_nan_weights_are_named(tmp_path):
    path = save_model(perturbed_network(), tmp_path / "m") / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["decoder.bias"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"decoder\.bias"):
        load_model(tmp_path / "m")
    tensors["decoder.bias"] = torch.full((5,), float("nan"))
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(tmp_path / "m")


def test_invalid_config_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_state": 7}))
    with pytest.raises(CheckpointError, match="even"):
        load_model(tmp_path)


@pytest.mark.parametrize(("u", "message"), [
    (torch.randn(2, 10), "shape"),
    (torch.randn(2, 10, 4), "shape"),
    (torch.full((1, 3, 3), float("nan")), "NaN"),
    (torch.full((1, 3, 3), float("inf")), "NaN or Inf"),
])
def test_bad_inputs_get_clear_errors(u, message):
    with pytest.raises(ValueError, match=message):
        check_input(u, 3)
    net = perturbed_network()
    with pytest.raises(ValueError, match=message):
        net.predict(u)


def test_network_copies_without_its_derived_caches():
    import copy

    net = perturbed_network(layer="s4")
    net.recurrent(1.0)  # populate the cache of recurrent forms
    twin = copy.deepcopy(net)
    u = torch.randn(1, 30, 3)
    a, _ = net.predict(u, return_state=True)
    b, _ = twin.predict(u, return_state=True)
    assert torch.equal(a, b)
