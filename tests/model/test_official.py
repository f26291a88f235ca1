"""Official state-spaces/s4 checkpoints import and reproduce the official float64 outputs."""

from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model, save_model
from model.official import OfficialImportError, import_official, read_state_dict
from tests.model.test_views import run_steps

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official-s4"
TOL = 1e-4


def load_case(case):
    folder = FIXTURES / case
    net = import_official(folder / "config.json", folder / "state_dict.pt", name=case)
    u = torch.load(folder / "inputs.pt", weights_only=True)["u"]
    expected = torch.load(folder / "expected.pt", weights_only=True)
    return net, u, expected


def stepped(rec, u):
    return run_steps(rec, u)[0]


@pytest.mark.parametrize("case", ["s4d_block", "s4_dplr_block", "s4d_minimal"])
def test_blocks_match_official_float64_reference(case, tmp_path):
    net, u, expected = load_case(case)
    if case == "s4d_minimal":  # transposed=True: (B, H, L)
        u, ref = u.transpose(1, 2), expected["y_ref64"].transpose(1, 2)
    else:
        ref = expected["y_ref64"]
    net = load_model(save_model(net, tmp_path / case))  # through our checkpoint format
    assert_three_views_match(net, u, ref, steps=1024)


def assert_three_views_match(net, u, ref, steps):
    """Convolution, chunked recurrence and per-sample steps (the first `steps`) vs ref."""
    with torch.no_grad():
        conv = net(u)
    rec = net.to_recurrent()
    chunk, _ = rec.chunk(u, rec.initial_state(u.shape[0]))
    step = stepped(rec, u[:, :steps])
    assert (conv.double() - ref).abs().max() < TOL
    assert (chunk.double() - ref).abs().max() < TOL
    assert (step.double() - ref[:, :steps]).abs().max() < TOL


@pytest.mark.parametrize("case", ["s4d_channels3", "s4_dplr_channels2", "s4d_softplus_lmax"])
def test_channels_and_transforms_match_official_float64_reference(case, tmp_path):
    """channels > 1 (S4D and S4), softplus dt, relu Re(A), l_max: conv, chunk and step."""
    net, u, expected = load_case(case)
    ref = expected["y_ref64"]
    net = load_model(save_model(net, tmp_path / case))
    assert net.config.channels == {"s4d_channels3": 3, "s4_dplr_channels2": 2}.get(case, 1)
    assert_three_views_match(net, u, ref, steps=512)


def test_bidirectional_block_predicts_and_refuses_to_stream(tmp_path):
    net, u, expected = load_case("s4d_bidirectional")
    net = load_model(save_model(net, tmp_path / "bidi"))
    assert net.config.bidirectional and not net.config.streamable
    y, _ = net.predict(u)
    assert (y.double() - expected["y_ref64"]).abs().max() < TOL
    # the anti-causal part matters: a causal-only model is far off
    causal = net.blocks[0].layer
    with torch.no_grad():
        causal.C_back.zero_()
    causal.clear_kernel_cache()
    assert (net.predict(u)[0].double() - expected["y_ref64"]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="bidirectional"):
        net.to_recurrent()
    with pytest.raises(ValueError, match="bidirectional"):
        net.predict(u, return_state=True)


def test_example_network_features_and_logits(tmp_path):
    net, u, expected = load_case("example_model")
    net = load_model(save_model(net, tmp_path / "example"))
    with torch.no_grad():
        features = net.features(u)
        logits = net(u)[:, -1]
    assert (features.double() - expected["y_ref64"]).abs().max() < TOL
    assert (logits.double() - expected["logits_ref64"]).abs().max() < TOL
    rec = net.to_recurrent()
    streamed = stepped(rec, u)[:, -1]
    assert (streamed.double() - expected["logits_ref64"]).abs().max() < TOL


def test_dplr_c_tilde_is_undone():
    """Treating the stored C̃ as C would be ~1e-3 off: the import must solve for C."""
    net, _, _ = load_case("s4_dplr_block")
    sd = read_state_dict(FIXTURES / "s4_dplr_block" / "state_dict.pt")
    stored = torch.view_as_complex(sd["layer.kernel.C"][0].double().contiguous())
    recovered = torch.view_as_complex(net.blocks[0].layer.C.double().contiguous())
    assert (stored - recovered).abs().max() > 1e-4


def test_lightning_style_checkpoint(tmp_path):
    sd = torch.load(FIXTURES / "s4d_block" / "state_dict.pt", weights_only=True)
    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}}, wrapped)
    net = import_official(FIXTURES / "s4d_block" / "config.json", wrapped)
    direct = import_official(FIXTURES / "s4d_block" / "config.json",
                             FIXTURES / "s4d_block" / "state_dict.pt")
    for a, b in zip(net.state_dict().values(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("change", "message"), [
    ({"bidirectional": True}, "bidirectional"),
    ({"disc": "dss"}, "dss"),
    # options that change the outputs and are not reproduced: refused, not ignored
    ({"bandlimit": 0.1}, "bandlimit"),
    ({"dt_fast": True}, "dt_fast"),
    ({"swap_channels": True}, "swap_channels"),
    ({"mult_act": "gelu"}, "mult_act"),
])
def test_unservable_variants_are_rejected(tmp_path, change, message):
    import json

    meta = json.loads((FIXTURES / "s4d_block" / "config.json").read_text())
    meta["constructor_kwargs"].update(change)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(meta))
    with pytest.raises(OfficialImportError, match=message):
        import_official(cfg, FIXTURES / "s4d_block" / "state_dict.pt")


def test_a_dplr_kernel_without_l_kernel_is_refused(tmp_path):
    sd = torch.load(FIXTURES / "s4_dplr_channels2" / "state_dict.pt", weights_only=True)
    del sd["layer.kernel.l_kernel"]  # C or C̃? unknown
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(OfficialImportError, match="l_kernel"):
        import_official(FIXTURES / "s4_dplr_channels2" / "config.json", tmp_path / "sd.pt")


def test_several_blocks_in_one_checkpoint_are_refused(tmp_path):
    sd = torch.load(FIXTURES / "s4d_block" / "state_dict.pt", weights_only=True)
    both = {f"model.layers.{i}.{k}": v for i in range(2) for k, v in sd.items()}
    torch.save({"state_dict": both}, tmp_path / "two.ckpt")
    with pytest.raises(OfficialImportError, match="2 S4 modules"):
        read_state_dict(tmp_path / "two.ckpt")


def test_relu_transforms_add_the_official_1e_4(tmp_path):
    """The official param_transform's relu is relu(x) + 1e-4, for dt and Im(A) alike."""
    import json

    meta = json.loads((FIXTURES / "s4d_block" / "config.json").read_text())
    meta["constructor_kwargs"].update(dt_transform="relu", imag_transform="relu")
    (tmp_path / "config.json").write_text(json.dumps(meta))
    sd = torch.load(FIXTURES / "s4d_block" / "state_dict.pt", weights_only=True)
    sd["layer.kernel.inv_dt"] = torch.full_like(sd["layer.kernel.inv_dt"], 0.01)
    torch.save(sd, tmp_path / "sd.pt")
    layer = import_official(tmp_path / "config.json", tmp_path / "sd.pt").blocks[0].layer
    assert torch.allclose(layer.log_dt.exp(), torch.tensor(0.0101), rtol=1e-5)
    im = -(sd["layer.kernel.A_imag"].double().relu() + 1e-4)
    assert torch.allclose(layer.a_imag[: im.shape[0]].double(), im, atol=1e-6)
