"""Import of checkpoints written by the official state-spaces/s4 code.

Supported: `S4Block` (models/s4/s4.py) in mode 'diag' (S4D) and 'dplr' (S4), with any
`channels`, `n_ssm`, the dt/real/imag transforms, `l_max` (see below) and, for 'diag',
`bidirectional` (served by predict only: it reads future samples); the minimal
`S4D` (models/s4/s4d.py), and the `S4Model` network of the repository's example.py. The
official parameterisations (transforms, sign conventions, C̃ = C(I - Ā^L), shared copies
n_ssm) are converted to s4serve's continuous-time parameters in float64.
State dicts are read with `torch.load(weights_only=True)`: nothing is unpickled.

`l_max`: the official convolution truncates its kernel at l_max taps, its step does not; the
imported model serves the SSM's full impulse response, i.e. the official step's outputs (the
same as its convolution for sequences up to l_max).
"""

from __future__ import annotations

import json
import pickle
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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        # torch's own message advises weights_only=False, which this tool never does
        reason = ("it holds objects other than tensors" if isinstance(exc, pickle.UnpicklingError)
                  else str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        raise OfficialImportError(f"{path}: not a plain tensor state dict (only tensors and "
                                  f"containers are read: {reason})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialImportError(f"{path}: not a state dict of tensors")
    found = {root: {key[: -len(root)] for key in obj if key.endswith(root)}
             for root in KNOWN_ROOTS}
    # a network (its encoder) holds its blocks; several blocks without one: which is meant
    # is not ours to guess
    prefixes = found["encoder.weight"] or found[KNOWN_ROOTS[0]] | found[KNOWN_ROOTS[1]]
    if len(prefixes) > 1:
        raise OfficialImportError(f"{path}: {len(prefixes)} S4 modules found "
                                  f"({', '.join(sorted(p or '(root)' for p in prefixes))}); "
                                  "save the one to import on its own")
    for prefix in prefixes:
        return {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    raise OfficialImportError(f"{path}: no official S4 module found (looked for keys ending in "
                       f"{', '.join(KNOWN_ROOTS)})")


def _transform(x: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """The official positive transforms (dt_transform, real_transform, imag_transform)."""
    x = x.double()
    if name == "exp":
        return torch.exp(x)
    if name == "softplus":
        return F.softplus(x)
    if name == "relu":  # the official relu keeps every parameter it transforms positive
        return F.relu(x) + 1e-4
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


def _check_options(kwargs: dict, dplr: bool) -> None:
    if kwargs.get("bidirectional") and dplr:
        raise OfficialImportError("bidirectional layers are imported for mode 'diag' (S4D) only")
    if kwargs.get("activation", "gelu") != "gelu" or kwargs.get("final_act", "glu") != "glu":
        raise OfficialImportError("only activation='gelu' with final_act='glu' is supported")
    for flag in ("gate", "bottleneck"):
        if kwargs.get(flag):
            raise OfficialImportError(f"S4Block option {flag} is not supported")
    if kwargs.get("is_real"):
        raise OfficialImportError("is_real=True (real diagonal SSMs) is not supported")
    # options that change the outputs and that this importer does not reproduce: refused
    # rather than imported with other numbers
    for flag in ("dt_fast", "swap_channels"):
        if kwargs.get(flag):
            raise OfficialImportError(f"S4Block option {flag}=True is not supported")
    for name in ("bandlimit", "mult_act"):
        if kwargs.get(name) is not None:
            raise OfficialImportError(f"S4Block option {name}={kwargs[name]!r} is not supported")


def _rows(x: torch.Tensor, h: int, channels: int, axis: int = 0) -> torch.Tensor:
    """Per-feature parameters (shared copies tiled to H) repeated for every output channel:
    SSM row c·H + h is feature h's system read out by channel c."""
    x = _tile(x, h, axis)
    return x.repeat(*[channels if i == axis else 1 for i in range(x.dim())])


def convert_block(sd: dict, kwargs: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Standalone S4Block -> a one-layer `sequence` model with d_input = d_output = d_model.

    channels > 1 become channels·H SSM rows (model/ssm.py); bidirectional blocks keep their
    backward readout as C_back and are served by predict only."""
    channels, h = sd["layer.D"].shape  # (C', H)
    mode = kwargs.get("mode", "dplr")
    dplr = "layer.kernel.P" in sd
    if (mode in ("diag", "s4d") and dplr) or (mode in ("dplr", "s4", "nplr") and not dplr):
        raise OfficialImportError(f"mode {mode!r} does not match the state dict")
    _check_options(kwargs, dplr)
    bidirectional = bool(kwargs.get("bidirectional", False))
    c_rows = sd["layer.kernel.C"].shape[0]
    if c_rows != channels * (2 if bidirectional else 1):
        raise OfficialImportError(f"layer.kernel.C has {c_rows} rows for {channels} channels "
                                  f"(bidirectional={bidirectional})")
    disc = "bilinear" if dplr else kwargs.get("disc", "zoh")
    if disc == "dss":
        raise OfficialImportError("disc='dss' has no recurrent step in the official code and "
                                  "cannot be streamed")
    inv_dt = sd["layer.kernel.inv_dt"]
    if inv_dt.shape[-1] != 1:
        raise OfficialImportError("dt_tie=False (a dt per state) is not supported")
    dt = _transform(inv_dt[:, 0], kwargs.get("dt_transform", "exp"), "dt_transform")  # (H,)
    dt = dt.repeat(channels)  # (H',) H' = C'·H
    re = _rows(-_transform(sd["layer.kernel.A_real"], kwargs.get("real_transform", "exp"),
                           "real_transform"), h, channels)  # (H', N2)
    im = _rows(-_transform(sd["layer.kernel.A_imag"], kwargs.get("imag_transform", "none"),
                           "imag_transform"), h, channels)  # (H', N2)
    b = _rows(_complex(sd["layer.kernel.B"])[0], h, channels)  # (H', N2)
    c_all = _complex(sd["layer.kernel.C"])  # (C' or 2C', H, N2)
    c = c_all[:channels].reshape(channels * h, -1)  # (H', N2), row c·H + h
    n2 = re.shape[-1]
    out = {"blocks.0.layer.D": sd["layer.D"].reshape(-1).float(),
           "blocks.0.layer.log_dt": dt.log().float(), "blocks.0.layer.B": _real(b),
           "blocks.0.layer.output_linear.weight": sd["output_linear.0.weight"].float(),
           "blocks.0.layer.output_linear.bias": sd["output_linear.0.bias"].float()}
    if dplr:
        p = _rows(_complex(sd["layer.kernel.P"]), h, channels, axis=1)  # (R, H', N2)
        if "layer.kernel.l_kernel" not in sd:  # the official module always saves it
            raise OfficialImportError("a DPLR kernel without its l_kernel buffer: whether C "
                                      "is stored as C or as C̃ = C (I - Ā^L) is unknown")
        length = int(sd["layer.kernel.l_kernel"])
        if length > 0:  # the stored C is C̃ = C (I - Ā^L): solve for C
            transition = dplr_transition(torch.complex(re, im), p, dt)  # (H', N, N)
            eye = torch.eye(2 * n2, dtype=torch.complex128)
            power = torch.linalg.matrix_power(transition, length)  # (H', N, N)
            c = torch.linalg.solve((eye - power).transpose(-1, -2), conj_extend(c))[:, :n2]
        out |= {"blocks.0.layer.log_lam_real": (-re).log().float(),
                "blocks.0.layer.lam_imag": im.float(), "blocks.0.layer.P": _real(p)}
    else:
        out |= {"blocks.0.layer.log_a_real": (-re).log().float(),
                "blocks.0.layer.a_imag": im.float()}
    out["blocks.0.layer.C"] = _real(c)
    if bidirectional:
        out["blocks.0.layer.C_back"] = _real(c_all[channels:].reshape(channels * h, -1))
    config = ModelConfig(task="sequence", layer="s4" if dplr else "s4d", d_input=h, d_output=h,
                         d_model=h, n_layers=1, d_state=2 * n2, rank=p.shape[0] if dplr else 1,
                         disc=disc, encoder=False, decoder=False, residual=False, norm="none",
                         channels=channels, bidirectional=bidirectional)
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
    try:
        meta: dict[str, Any] = json.loads(Path(config_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OfficialImportError(f"{config_path}: not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise OfficialImportError(f"{config_path}: expected a JSON object of constructor "
                                  "arguments")
    kwargs = meta.get("constructor_kwargs", meta)
    if not isinstance(kwargs, dict):
        raise OfficialImportError(f"{config_path}: constructor_kwargs must be a JSON object")
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
