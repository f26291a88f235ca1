"""Import of checkpoints written by the official state-spaces/s4 code.

Supported: `S4Block` (models/s4/s4.py) in mode 'diag' (S4D) and 'dplr' (S4), the minimal
`S4D` (models/s4/s4d.py), and the `S4Model` network of the repository's example.py. The
official parameterisations (transforms, sign conventions, C̃ = C(I - Ā^L), shared copies
n_ssm) are converted to s4serve's continuous-time parameters in float64.
State dicts are read with `torch.load(weights_only=True)`: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.kernels import conj_extend, dplr_transition
from model.network import S4Network

KNOWN_ROOTS = ("layer.kernel.inv_dt", "kernel.log_dt", "encoder.weight")


class OfficialImportError(ValueError):
    """A checkpoint that cannot be imported, with the reason."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain or Lightning-style ({"state_dict": ...}, prefixed keys) state dict, safely."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialImportError(f"{path}: not a state dict of tensors")
    for key in obj:
        for root in KNOWN_ROOTS:
            if key.endswith(root):
                prefix = key[: -len(root)]
                return {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    raise OfficialImportError(f"{path}: no official S4 module found (looked for keys ending in "
                       f"{', '.join(KNOWN_ROOTS)})")


def _transform(x: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """The official positive transforms (dt_transform, real_transform)."""
    x = x.double()
    if name == "exp":
        return torch.exp(x)
    if name == "softplus":
        return F.softplus(x)
    if name == "relu":
        return F.relu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name in ("none", "identity"):
        return x
    raise OfficialImportError(f"unsupported {what} {name!r}")


def _tile(x: torch.Tensor, h: int, axis: int) -> torch.Tensor:
    """Shared copies (n_ssm < H): feature h uses copy h mod S."""
    copies = x.shape[axis]
    if h % copies:
        raise OfficialImportError(f"d_model {h} is not a multiple of n_ssm {copies}")
    return x.repeat(*[h // copies if i == axis else 1 for i in range(x.dim())])


def _complex(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(x.double().contiguous())


def _real(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(x).float().contiguous()


def _single_channel(sd: dict, kwargs: dict) -> None:
    if kwargs.get("bidirectional"):
        raise OfficialImportError("bidirectional layers look at the future and cannot be stepped; "
                           "s4serve serves causal streams only")
    if sd["layer.kernel.C"].shape[0] != 1 or kwargs.get("channels", 1) != 1:
        raise OfficialImportError("only channels=1 is supported (one SSM output per feature)")
    if kwargs.get("activation", "gelu") != "gelu" or kwargs.get("final_act", "glu") != "glu":
        raise OfficialImportError("only activation='gelu' with final_act='glu' is supported")
    for flag in ("gate", "bottleneck"):
        if kwargs.get(flag):
            raise OfficialImportError(f"S4Block option {flag} is not supported")


def convert_block(sd: dict, kwargs: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Standalone S4Block -> a one-layer `sequence` model with d_input = d_output = d_model."""
    _single_channel(sd, kwargs)
    h = sd["layer.D"].shape[1]
    mode = kwargs.get("mode", "dplr")
    dplr = "layer.kernel.P" in sd
    if (mode in ("diag", "s4d") and dplr) or (mode in ("dplr", "s4", "nplr") and not dplr):
        raise OfficialImportError(f"mode {mode!r} does not match the state dict")
    disc = "bilinear" if dplr else kwargs.get("disc", "zoh")
    if disc == "dss":
        raise OfficialImportError("disc='dss' has no recurrent step in the official code and "
                                  "cannot be streamed")
    if kwargs.get("is_real"):
        raise OfficialImportError("is_real=True (real diagonal SSMs) is not supported")
    inv_dt = sd["layer.kernel.inv_dt"]
    if inv_dt.shape[-1] != 1:
        raise OfficialImportError("dt_tie=False (a dt per state) is not supported")
    dt = _transform(inv_dt[:, 0], kwargs.get("dt_transform", "exp"), "dt_transform")  # (H,)
    re = -_transform(sd["layer.kernel.A_real"], kwargs.get("real_transform", "exp"),
                     "real_transform")  # (S, N2)
    im = -_transform(sd["layer.kernel.A_imag"], kwargs.get("imag_transform", "none"),
                     "imag_transform")
    re, im = _tile(re, h, 0), _tile(im, h, 0)  # (H, N2)
    b = _tile(_complex(sd["layer.kernel.B"])[0], h, 0)  # (H, N2)
    c = _complex(sd["layer.kernel.C"])[0]  # (H, N2)
    n2 = re.shape[-1]
    out = {"blocks.0.layer.D": sd["layer.D"][0].float(), "blocks.0.layer.log_dt": dt.log().float(),
           "blocks.0.layer.B": _real(b),
           "blocks.0.layer.output_linear.weight": sd["output_linear.0.weight"].float(),
           "blocks.0.layer.output_linear.bias": sd["output_linear.0.bias"].float()}
    if dplr:
        p = _tile(_complex(sd["layer.kernel.P"]), h, 1)  # (R, H, N2)
        length = int(sd.get("layer.kernel.l_kernel", torch.tensor(0)))
        if length > 0:  # the stored C is C̃ = C (I - Ā^L): solve for C
            transition = dplr_transition(torch.complex(re, im), p, dt)  # (H, N, N)
            eye = torch.eye(2 * n2, dtype=torch.complex128)
            power = torch.linalg.matrix_power(transition, length)  # (H, N, N)
            c = torch.linalg.solve((eye - power).transpose(-1, -2), conj_extend(c))[:, :n2]
        out |= {"blocks.0.layer.log_lam_real": (-re).log().float(),
                "blocks.0.layer.lam_imag": im.float(), "blocks.0.layer.P": _real(p)}
    else:
        out |= {"blocks.0.layer.log_a_real": (-re).log().float(),
                "blocks.0.layer.a_imag": im.float()}
    out["blocks.0.layer.C"] = _real(c)
    config = ModelConfig(task="sequence", layer="s4" if dplr else "s4d", d_input=h, d_output=h,
                         d_model=h, n_layers=1, d_state=2 * n2, rank=p.shape[0] if dplr else 1,
                         disc=disc, encoder=False, decoder=False, residual=False, norm="none")
    return config, out


def _minimal_layer(sd: dict, prefix: str, target: str) -> dict[str, torch.Tensor]:
    """One minimal S4D (s4d.py): B = 1, A = -exp(log_A_real) + i·A_imag, ZOH."""
    w = sd[f"{prefix}output_linear.0.weight"]
    c = _complex(sd[f"{prefix}kernel.C"])  # (H, N2)
    return {f"{target}D": sd[f"{prefix}D"].float(),
            f"{target}log_dt": sd[f"{prefix}kernel.log_dt"].float(),
            f"{target}log_a_real": sd[f"{prefix}kernel.log_A_real"].float(),
            f"{target}a_imag": sd[f"{prefix}kernel.A_imag"].float(),
            f"{target}B": _real(torch.ones_like(c)), f"{target}C": _real(c),
            f"{target}output_linear.weight": (w[..., 0] if w.dim() == 3 else w).float(),
            f"{target}output_linear.bias": sd[f"{prefix}output_linear.0.bias"].float()}


def convert_minimal(sd: dict, kwargs: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    h, n2 = sd["kernel.log_A_real"].shape
    config = ModelConfig(task="sequence", layer="s4d", disc="zoh", d_input=h, d_output=h,
                         d_model=h, n_layers=1, d_state=2 * n2, encoder=False, decoder=False,
                         residual=False, norm="none")
    return config, _minimal_layer(sd, "", "blocks.0.layer.")


def convert_example(sd: dict, kwargs: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """example.py's S4Model: encoder, S4D blocks with LayerNorm, mean pooling, decoder."""
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("s4_layers."))
    d_model, d_input = sd["encoder.weight"].shape
    d_output = sd["decoder.weight"].shape[0]
    n2 = sd["s4_layers.0.kernel.log_A_real"].shape[1]
    out = {k: sd[k].float() for k in ("encoder.weight", "encoder.bias", "decoder.weight",
                                      "decoder.bias")}
    for i in range(n_layers):
        out |= _minimal_layer(sd, f"s4_layers.{i}.", f"blocks.{i}.layer.")
        out[f"blocks.{i}.norm.weight"] = sd[f"norms.{i}.weight"].float()
        out[f"blocks.{i}.norm.bias"] = sd[f"norms.{i}.bias"].float()
    config = ModelConfig(task="classification", layer="s4d", disc="zoh", d_input=d_input,
                         d_output=d_output, d_model=d_model, n_layers=n_layers, d_state=2 * n2,
                         prenorm=bool(kwargs.get("prenorm", False)))
    return config, out


def import_official(config_path: str | Path, weights_path: str | Path,
                    name: str | None = None) -> S4Network:
    """Build an s4serve network from an official checkpoint and its constructor arguments."""
    meta: dict[str, Any] = json.loads(Path(config_path).read_text())
    kwargs = meta.get("constructor_kwargs", meta)
    sd = read_state_dict(weights_path)
    if "encoder.weight" in sd:
        config, tensors = convert_example(sd, kwargs)
    elif "layer.kernel.inv_dt" in sd:
        config, tensors = convert_block(sd, kwargs)
    elif "kernel.log_dt" in sd:
        config, tensors = convert_minimal(sd, kwargs)
    else:
        raise OfficialImportError(f"{weights_path}: unrecognised official module")
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise OfficialImportError("the converted parameters contain NaN or Inf (is Re(A) < 0?)")
    source = meta.get("module") or meta.get("case") or "state-spaces/s4"
    config = config.model_copy(update={
        "name": name or meta.get("case", "imported"),
        "description": f"imported from the official state-spaces/s4 {source}"})
    net = S4Network(ModelConfig.model_validate(config.model_dump()))
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise OfficialImportError(f"conversion left missing {missing} / unexpected {unexpected}")
    return net.eval()
