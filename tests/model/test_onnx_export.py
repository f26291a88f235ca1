"""ONNX export: graphs pass the checker, hold no complex tensors, and onnxruntime reproduces
torch's step and chunk (outputs and states) with a dynamic batch."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import perturbed_network

from model.checkpoint import save_model
from model.onnx_export import check_graph, export_onnx, fingerprint, read_manifest
from model.onnx_runtime import OnnxRecurrence, onnx_step_latency, torch_step_latency

CASES = {
    "s4d-zoh-cls": dict(layer="s4d", disc="zoh", task="classification"),
    "s4d-bilinear-seq": dict(layer="s4d", disc="bilinear", task="sequence", init="lin"),
    "s4-cls": dict(layer="s4", task="classification", rank=2),
    "s4d-channels2-seq": dict(layer="s4d", task="sequence", channels=2),
}
BLOCK, EXTRA = 32, (8,)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    net = perturbed_network(seed=len(request.param), **CASES[request.param])
    out = tmp_path_factory.mktemp(request.param)
    paths = export_onnx(net, out, chunk=BLOCK, extra_chunks=EXTRA)
    return net, paths, OnnxRecurrence(out, threads=1)


def as_numpy(state):
    return [x.numpy() for x in state]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny tensors: torch's thread pool only adds overhead (a lot on a busy CI machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(a: np.ndarray, b: torch.Tensor) -> bool:
    b = b.numpy()
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        (np.abs(a - b) <= TOL["atol"] + TOL["rtol"] * np.abs(b)).all())


def assert_same(ort_out, torch_out):
    (y_o, state_o), (y_t, state_t) = ort_out, torch_out
    assert len(state_o) == len(state_t)
    if not (close(y_o, y_t) and all(map(close, state_o, state_t))):  # cheap check, then detail
        np.testing.assert_allclose(y_o, y_t.numpy(), **TOL)
        for a, b in zip(state_o, state_t, strict=True):
            np.testing.assert_allclose(a, b.numpy(), **TOL)
            assert a.dtype == b.numpy().dtype


def test_graphs_pass_checker_and_are_real(exported):
    _, paths, _ = exported
    assert {"step", "chunk", "chunk_8", "manifest"} <= set(paths)
    for key, path in paths.items():
        if key == "manifest":
            continue
        model = check_graph(path)
        assert not model.graph.initializer or all(
            t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        ops = {node.op_type for node in model.graph.node}
        assert not ops & {"DFT", "STFT"}, ops
        batch_dims = [i.type.tensor_type.shape.dim[0] for i in model.graph.input]
        assert all(d.dim_param and not d.dim_value for d in batch_dims)  # dynamic batch


def test_manifest_describes_graphs(exported):
    net, paths, _ = exported
    manifest = read_manifest(paths["manifest"].parent)
    rec = net.to_recurrent()
    names = [n for n, _, _ in rec.state_spec]
    assert manifest["inputs"] == ["samples", *names]
    assert manifest["outputs"] == ["outputs", *(f"next.{n}" for n in names)]
    assert manifest["chunk"] == BLOCK and manifest["chunks"] == {"32": "chunk.onnx",
                                                                  "8": "chunk_8.onnx"}
    assert manifest["state_bytes"] == rec.state_bytes
    assert manifest["fingerprint"] == fingerprint(net)
    graph = onnx.load(str(paths["step"]))
    assert [i.name for i in graph.graph.input] == manifest["inputs"]
    assert [o.name for o in graph.graph.output] == manifest["outputs"]


@pytest.mark.parametrize("batch", [1, 7])
def test_step_matches_torch(exported, batch):
    net, _, ort_rec = exported
    rec = net.to_recurrent()
    gen = torch.Generator().manual_seed(batch)
    state_t = rec.initial_state(batch)
    state_o = ort_rec.initial_state(batch)
    for _ in range(200):
        u = torch.randn(batch, net.config.d_input, generator=gen)
        y_t, state_t = rec.step(u, state_t)
        y_o, state_o = ort_rec.step(u.numpy(), state_o)
        assert_same((y_o, state_o), (y_t, state_t))


@pytest.mark.parametrize("batch", [1, 7])
def test_chunk_graph_matches_torch(exported, batch):
    net, _, ort_rec = exported
    rec = net.to_recurrent()
    gen = torch.Generator().manual_seed(10 + batch)
    state_t = rec.initial_state(batch)
    state_o = ort_rec.initial_state(batch)
    for length in (BLOCK, BLOCK, 8, BLOCK + 8 + 3, 1, 2 * BLOCK + 5):  # graphs, ladder, steps
        u = torch.randn(batch, length, net.config.d_input, generator=gen)
        y_t, state_t = rec.chunk(u, state_t)
        y_o, state_o = ort_rec.chunk(u.numpy(), state_o)
        assert y_o.shape == (batch, length, net.config.d_output)
        assert_same((y_o, state_o), (y_t, state_t))


def test_long_block_uses_toeplitz_and_rate_is_baked_in(tmp_path):
    # T above the model's FFT threshold must still export real-only; rate 0.5 halves dt.
    net = perturbed_network(seed=3, layer="s4d", task="regression", chunk_max=128)
    export_onnx(save_model(net, tmp_path / "model"), tmp_path / "onnx", rate=0.5, chunk=128)
    ort_rec = OnnxRecurrence(tmp_path / "onnx")
    assert ort_rec.rate == 0.5
    rec = net.to_recurrent(0.5)
    u = torch.randn(3, 128 + 4, net.config.d_input, generator=torch.Generator().manual_seed(0))
    assert_same(ort_rec.chunk(u.numpy(), ort_rec.initial_state(3)),
                rec.chunk(u, rec.initial_state(3)))
    at_rate_1 = net.to_recurrent(1.0).chunk(u, rec.initial_state(3))[0]
    assert not np.allclose(at_rate_1.numpy(), ort_rec.chunk(u.numpy(),
                                                            ort_rec.initial_state(3))[0])


def test_rejects_bad_block_and_rate(tmp_path):
    net = perturbed_network(seed=4, layer="s4")
    with pytest.raises(ValueError, match="power of two"):
        export_onnx(net, tmp_path, chunk=24)
    with pytest.raises(ValueError, match="rate"):
        export_onnx(net, tmp_path, rate=0.0)
    assert not (tmp_path / "manifest.json").exists()


def test_latency_helpers_measure_something():
    net = perturbed_network(seed=5, layer="s4d")
    for seconds in (onnx_step_latency(net, batch=2, repeats=5, threads=1),
                    torch_step_latency(net, batch=2, repeats=5)):
        assert 0 < seconds < 10


def test_manifest_is_plain_json(exported):
    _, paths, _ = exported
    manifest = json.loads(paths["manifest"].read_text())
    assert all(s["dtype"] in ("float32", "float64") for s in manifest["state_spec"])


def test_dynamo_exporter_gives_the_same_graph_semantics(tmp_path):
    net = perturbed_network(seed=6, layer="s4d", task="classification", n_layers=1, d_model=4)
    export_onnx(net, tmp_path, chunk=8, exporter="dynamo")
    ort_rec, rec = OnnxRecurrence(tmp_path), net.to_recurrent()
    u = torch.randn(4, 8 + 3, net.config.d_input, generator=torch.Generator().manual_seed(6))
    assert_same(ort_rec.chunk(u.numpy(), ort_rec.initial_state(4)),
                rec.chunk(u, rec.initial_state(4)))
