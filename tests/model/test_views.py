"""Step, chunk and convolution agree with each other and with a float64 dense reference."""

import random

import pytest
import torch

from model.reference import reference_outputs
from tests.model.conftest import perturbed_network

CASES = [("s4d", "zoh", "legs", 1), ("s4d", "bilinear", "lin", 1), ("s4", "bilinear", "legs", 1),
         ("s4", "bilinear", "legs", 2)]


def run_steps(rec, u):
    state = rec.initial_state(u.shape[0])
    ys = []
    for t in range(u.shape[1]):
        y, state = rec.step(u[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def run_chunks(rec, u, seed=0):
    rng = random.Random(seed)
    state = rec.initial_state(u.shape[0])
    ys, t = [], 0
    while t < u.shape[1]:
        size = rng.choice([1, 2, 3, 7, 64, 65, 100, 300, 1000])
        y, state = rec.chunk(u[:, t:t + size], state)
        ys.append(y)
        t += size
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize(("layer", "disc", "init", "rank"), CASES)
def test_three_views_match_float64_reference_at_4096(layer, disc, init, rank):
    net = perturbed_network(layer=layer, disc=disc, init=init, rank=rank, task="regression",
                            d_model=8, n_layers=2, d_state=32, chunk_max=256)
    u = torch.randn(2, 4096, 3)
    ref = reference_outputs(net, u)
    with torch.no_grad():
        conv = net(u)
    rec = net.to_recurrent()
    stepped, state_s = run_steps(rec, u)
    chunked, state_c = run_chunks(rec, u)
    assert ref.abs().max() > 0.1  # a meaningful signal, not all zeros
    for name, y in (("conv", conv), ("step", stepped), ("chunk", chunked)):
        err = (y.double() - ref).abs().max().item()
        assert err < 1e-4, f"{name} is {err:.2e} off the float64 reference"
    for a, b in zip(state_s, state_c, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", ["s4d", "s4"])
@pytest.mark.parametrize("rate", [0.5, 2.0])
def test_views_agree_at_other_rates(layer, rate):
    net = perturbed_network(layer=layer, task="classification", labels=list("abcde"))
    u = torch.randn(2, 700, 3)
    with torch.no_grad():
        conv = net(u, rate=rate)
    rec = net.to_recurrent(rate=rate)
    stepped, _ = run_steps(rec, u)
    chunked, _ = run_chunks(rec, u, seed=1)
    assert (conv - stepped).abs().max() < 1e-4
    assert (conv - chunked).abs().max() < 1e-4
    # and the rate really changes the model
    with torch.no_grad():
        assert (net(u, rate=1.0) - conv).abs().max() > 1e-3


def test_rate_is_a_dt_rescale():
    """Running at rate r equals a model whose log dt is lowered by log r."""
    net = perturbed_network(layer="s4d", task="regression")
    u = torch.randn(1, 300, 3)
    with torch.no_grad():
        at_half = net(u, rate=0.5)
        for block in net.blocks:
            block.layer.log_dt.add_(torch.log(torch.tensor(2.0)))
        rescaled = net(u)
    assert torch.allclose(at_half, rescaled, atol=1e-5)


def test_classification_is_causal_and_last_step_is_mean_pooled():
    net = perturbed_network(layer="s4d", task="classification", labels=list("abcde"))
    u = torch.randn(1, 200, 3)
    with torch.no_grad():
        y = net(u)
        v = u.clone()
        v[:, 120:] = torch.randn(1, 80, 3)  # change only the future
        assert torch.allclose(net(v)[:, :120], y[:, :120], atol=1e-6)
        pooled = net.decoder(net.features(u).mean(dim=1))
    assert torch.allclose(y[:, -1], pooled, atol=1e-5)


def test_batching_does_not_change_a_sequence():
    net = perturbed_network(layer="s4")
    u = torch.randn(5, 128, 3)
    rec = net.to_recurrent()
    batched, _ = run_steps(rec, u)
    alone, _ = run_steps(rec, u[2:3])
    assert torch.allclose(batched[2:3], alone, atol=1e-6)


def test_chunk_continues_from_a_given_state():
    net = perturbed_network(layer="s4")
    u = torch.randn(2, 500, 3)
    rec = net.to_recurrent()
    full, state_full = rec.chunk(u, rec.initial_state(2))
    _, mid = rec.chunk(u[:, :123], rec.initial_state(2))
    rest, state_rest = net.predict(u[:, 123:], state=mid, return_state=True)
    assert torch.allclose(full[:, 123:], rest, atol=1e-5)
    for a, b in zip(state_full, state_rest, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layer", ["s4d", "s4"])
def test_compiled_step_gives_the_same_numbers_at_any_batch(layer):
    net = perturbed_network(layer=layer, task="classification", labels=list("abcde"))
    rec = net.to_recurrent(rate=0.5)
    fast = rec.compiled_step("torchscript")
    for batch in (1, 5):
        u = torch.randn(batch, 40, 3)
        eager, _ = run_steps(rec, u)
        state, out = rec.initial_state(batch), []
        for t in range(u.shape[1]):
            y, state = fast(u[:, t], state)
            out.append(y)
        assert torch.allclose(torch.stack(out, dim=1), eager, atol=1e-6)


def test_inductor_step_gives_the_same_numbers():
    net = perturbed_network(layer="s4d", task="classification", labels=list("abcde"))
    rec = net.to_recurrent()
    fast = rec.compiled_step("inductor")
    for batch in (1, 3):
        u = torch.randn(batch, 5, 3)
        eager, _ = run_steps(rec, u)
        state, out = rec.initial_state(batch), []
        with torch.no_grad():
            for t in range(u.shape[1]):
                y, state = fast(u[:, t], state)
                out.append(y)
        assert torch.allclose(torch.stack(out, dim=1), eager, atol=1e-5)


def test_the_inference_conv_path_equals_the_autograd_path_and_leaves_inputs_alone():
    """Without autograd a block runs through reused buffers and sums its residual in place;
    the numbers are those of the differentiable path, and the caller's tensors are untouched."""
    for layer in ("s4d", "s4"):
        net = perturbed_network(layer=layer)
        x = torch.randn(3, 200, 16)
        with torch.no_grad():  # float64 takes the plain path (the buffers are float32)
            net.double().blocks[0](x.double())
        net.float()
        kept = x.clone()
        with torch.inference_mode():  # as the server's backend runs it
            first = net.blocks[0](x)
        with torch.no_grad():  # the same thread's buffers, now outside inference mode
            lean = net.blocks[0](x)
            again = net.blocks[0](x)  # the buffers are reused: same answer twice
            net.blocks[0](x[:, :150])  # a shorter sequence in between
            assert torch.equal(net.blocks[0](x), lean)  # its samples left no trace
        assert torch.equal(first, lean)
        plain = net.blocks[0](x).detach()
        assert torch.equal(x, kept)
        assert torch.allclose(lean, plain, rtol=0, atol=1e-6)
        assert torch.equal(lean, again)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_a_rate_that_is_not_a_positive_finite_number_is_refused(rate):
    from tests.model.conftest import perturbed_network

    with pytest.raises(ValueError, match="positive finite"):
        perturbed_network(layer="s4d", task="sequence").to_recurrent(rate)


def test_a_pooled_classifier_with_several_channels_steps_as_it_convolves():
    import torch

    from model.config import ModelConfig
    from model.network import S4Network

    torch.manual_seed(0)
    net = S4Network(ModelConfig(name="c", task="classification", d_input=2, d_output=3,
                                d_model=4, d_state=8, n_layers=2, channels=2,
                                labels=["a", "b", "c"])).eval()
    u = torch.randn(2, 30, 2)
    rec = net.to_recurrent()
    stepped, _ = run_steps(rec, u)
    with torch.no_grad():
        whole = net(u)
    assert stepped.shape == whole.shape and torch.allclose(stepped, whole, atol=1e-4)


@pytest.mark.parametrize("last", [False, True])
def test_a_batch_in_passes_on_threads_equals_the_batch_whole(last):
    """predict in passes of 2 sequences, on a pool's threads or not, gives the numbers of the
    whole batch in one pass (under inference mode too, as the server runs it)."""
    from concurrent.futures import ThreadPoolExecutor

    net = perturbed_network(layer="s4d").eval()
    u = torch.randn(5, 300, 3)
    whole, _ = net.predict(u, last=last)
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        threaded, _ = net.predict(u, last=last, max_batch=2, pool=pool)
        inline, _ = net.predict(u, last=last, max_batch=2)
    assert threaded.shape == whole.shape == (5, 1 if last else 300, whole.shape[-1])
    assert torch.equal(threaded, inline)  # the same passes, wherever they ran
    torch.testing.assert_close(threaded, whole, atol=1e-5, rtol=1e-5)


def test_a_pass_that_fails_on_a_thread_fails_the_call_and_the_pool_serves_the_next():
    from concurrent.futures import ThreadPoolExecutor

    net = perturbed_network(layer="s4d").eval()
    u = torch.randn(4, 100, 3)
    bad = u.clone()
    bad[3] = 1e3  # a value this test's forward refuses, on the last pass
    forward = net.forward

    def strict(x, rate=1.0):
        if x.abs().max() > 100:
            raise RuntimeError("a pass failed")
        return forward(x, rate)

    with ThreadPoolExecutor(2) as pool:
        net.forward = strict
        with pytest.raises(RuntimeError, match="a pass failed"):
            net.predict(bad, max_batch=1, pool=pool)
        good, _ = net.predict(u, max_batch=1, pool=pool)
        del net.forward
    torch.testing.assert_close(good, net.predict(u)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("last", [False, True])
def test_passes_written_into_a_given_output_equal_the_batch_whole(last):
    from concurrent.futures import ThreadPoolExecutor

    net = perturbed_network(layer="s4d").eval()
    u = torch.randn(5, 200, 3)
    whole, _ = net.predict(u, last=last)
    for size, threads in ((2, 2), (5, 2), (2, 0)):
        out = torch.full_like(whole, float("nan"))
        with ThreadPoolExecutor(threads or 1) as pool, torch.inference_mode():
            got, _ = net.predict(u, last=last, max_batch=size, pool=pool if threads else None,
                                 out=out)
        assert got.data_ptr() == out.data_ptr()  # written in place, every element
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
