"""The onnxruntime backend gives the torch backend's numbers through the backend interface."""

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model.checkpoint import save_model
from model.config import ModelConfig
from model.network import S4Network
from model.onnx_export import export_onnx, read_manifest
from server.backends.base import load_backend
from server.backends.onnx import OnnxBackend
from server.backends.torch import TorchBackend
from tests.server.conftest import ServerThread, make_settings

TOL = dict(rtol=1e-5, atol=1e-5)
CONFIGS = {
    "seq": dict(task="sequence", layer="s4d", d_input=2, d_output=3, d_model=16, n_layers=2,
                d_state=8, sample_rate=100.0, chunk_max=32),
    "cls": dict(task="classification", layer="s4", d_input=1, d_output=3, d_model=16,
                n_layers=2, d_state=8, labels=["a", "b", "c"], sample_rate=16000.0),
}


def perturbed_dir(root: Path, name: str) -> Path:
    torch.manual_seed(len(name))
    net = S4Network(ModelConfig(name=name, **CONFIGS[name]))
    with torch.no_grad():
        for p in net.parameters():  # off the initialisation, as after training
            p.add_(0.1 * p.std().clamp(min=0.05) * torch.randn_like(p))
    return save_model(net, root / name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory, cache):
    model_dir = perturbed_dir(tmp_path_factory.mktemp("models"), request.param)
    from_registry = load_backend("onnx", model_dir, "cpu", onnx_cache=cache, onnx_threads=1)
    assert isinstance(from_registry, OnnxBackend) and from_registry.threads == 1
    assert from_registry.export_dir(1.0).is_relative_to(cache)
    return TorchBackend(model_dir, device="cpu"), OnnxBackend(model_dir, "cpu", cache_dir=cache)


@pytest.fixture(autouse=True)
def single_threaded_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds overhead
    yield
    torch.set_num_threads(before)


def assert_same(a, b):
    (y_a, s_a), (y_b, s_b) = a, b
    np.testing.assert_allclose(y_a.numpy(), y_b.numpy(), **TOL)
    for x, y in zip(s_a, s_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(x.numpy(), y.numpy(), **TOL)


def test_info_and_state_spec_match_torch(pair):
    torch_b, onnx_b = pair
    info_t, info_o = torch_b.info.as_dict(), onnx_b.info.as_dict()
    assert info_o.pop("backend") == "onnx" and info_t.pop("backend") == "torch"
    assert info_o == info_t
    assert onnx_b.state_spec == torch_b.state_spec


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_step_and_chunk_match_torch(pair, rate):
    torch_b, onnx_b = pair
    d_in = torch_b.info.d_input
    gen = torch.Generator().manual_seed(7)
    s_t, s_o = torch_b.initial_state(5), onnx_b.initial_state(5)
    for _ in range(40):
        u = torch.randn(5, d_in, generator=gen)
        (y_t, s_t), (y_o, s_o) = torch_b.step(u, s_t, rate), onnx_b.step(u, s_o, rate)
        assert_same((y_o, s_o), (y_t, s_t))
    for length in (1, 3, 37, 70):  # steps only, ladder + steps, several full blocks
        u = torch.randn(5, length, d_in, generator=gen)
        (y_t, s_t), (y_o, s_o) = torch_b.chunk(u, s_t, rate), onnx_b.chunk(u, s_o, rate)
        assert y_o.shape == (5, length, torch_b.info.d_output)
        assert_same((y_o, s_o), (y_t, s_t))


def test_predict_matches_torch(pair):
    torch_b, onnx_b = pair
    u = torch.randn(2, 50, torch_b.info.d_input, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(onnx_b.predict(u, 1.0)[0].numpy(),
                               torch_b.predict(u, 1.0)[0].numpy(), **TOL)
    start = torch_b.predict(u, 1.0, return_state=True)[1]
    assert_same(onnx_b.predict(u, 1.0, state=start, return_state=True),
                torch_b.predict(u, 1.0, state=start, return_state=True))
    with pytest.raises(ValueError):
        onnx_b.predict(u, 1.0, state=start[:-1], return_state=True)


def test_exports_are_cached_and_preexported_graphs_are_used(pair, cache):
    _, onnx_b = pair
    cached = onnx_b.export_dir(1.0)
    assert cached.is_relative_to(cache) and read_manifest(cached) is not None
    stamp = (cached / "manifest.json").stat().st_mtime_ns
    again = OnnxBackend(onnx_b.model_dir, "cpu", cache_dir=cache)
    assert (again.export_dir(1.0) / "manifest.json").stat().st_mtime_ns == stamp
    shipped = export_onnx(onnx_b.model_dir, onnx_b.model_dir / "onnx", chunk=4)["manifest"]
    try:
        assert again.export_dir(1.0) == shipped.parent
        assert again.export_dir(0.5).is_relative_to(cache)  # shipped graphs are for rate 1
    finally:
        for path in shipped.parent.iterdir():
            path.unlink()
        shipped.parent.rmdir()


def test_refuses_gpu_devices(pair):
    with pytest.raises(ValueError, match="CPU"):
        OnnxBackend(pair[1].model_dir, device="cuda:0")


def test_server_serves_a_model_on_onnx(tmp_path, monkeypatch):
    cache = tmp_path / "onnx-cache"
    monkeypatch.setenv("S4SERVE_ONNX_CACHE", str(cache))  # read by Settings, as in a deployment
    dirs = {"seq": perturbed_dir(tmp_path, "seq")}
    settings = make_settings(dirs, tmp_path, backends={"seq": "onnx"})
    u = np.random.default_rng(0).standard_normal((1, 20, 2)).tolist()
    with ServerThread(settings) as server:
        info = httpx.get(server.url + "/v1/models/seq").json()
        answer = httpx.post(server.url + "/v1/models/seq/predict",
                            json={"inputs": u, "return_state": True}).json()
    assert info["backend"] == "onnx" and info["device"] == "cpu"
    assert list(cache.glob("*/rate1-T*/manifest.json"))  # its graphs were exported there
    expected = TorchBackend(dirs["seq"], "cpu").predict(torch.tensor(u, dtype=torch.float32), 1.0)
    np.testing.assert_allclose(np.array(answer["outputs"]), expected[0].numpy(), **TOL)
