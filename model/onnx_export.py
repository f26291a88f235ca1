"""ONNX export of the recurrent views: a per-sample step graph and a fixed-length chunk graph.

Both graphs use real arithmetic only: the recurrent state is already split into float32 real and
imaginary tensors (model/recurrent.py), and the chunk graph is traced on the Toeplitz form of the
causal convolution instead of the FFT (complex tensors do not export with a dynamic batch, see
docs/onnx.md). Discretisation happens at export time, so a graph serves one `rate`.

Files written into `out_dir`:
    step.onnx        samples (B, d_input), state...     -> outputs (B, d_output), next.state...
    chunk.onnx       samples (B, T, d_input), state...  -> outputs (B, T, d_output), next.state...
    chunk_<t>.onnx   the same for each extra block length t (optional, see `extra_chunks`)
    manifest.json    names, shapes, rate, block lengths, the weights' fingerprint
Every graph is a single file (no external data) with a dynamic batch axis.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from torch import nn

import model.recurrent as recurrent
from model.checkpoint import load_model
from model.network import RecurrentNetwork, S4Network

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "s4serve-onnx"
MANIFEST_VERSION = 1
OPSET = 18  # the dynamo exporter's lowest; LayerNormalization needs >= 17
DEFAULT_CHUNK = recurrent.DIRECT_CONV_MAX  # the longest block the model already convolves directly

# What the legacy exporter says about every graph it writes, all expected here. Filtered once,
# not in warnings.catch_warnings(): the onnx backend exports in the server's model-loading
# thread, and that context manager swaps the process-wide filters (model/network.py says why).
for _message, _category, _module in (
    ("You are using the legacy TorchScript-based ONNX export", DeprecationWarning, ""),
    ("The feature will be removed", DeprecationWarning, r"torch\.onnx"),
    ("ONNX Preprocess - Removing mutation", UserWarning, r"torch\.onnx"),
    ("Converting a tensor to a Python", torch.jit.TracerWarning, ""),
):
    warnings.filterwarnings("ignore", message=_message, category=_category, module=_module)
SAMPLES, OUTPUTS, NEXT_PREFIX = "samples", "outputs", "next."
COMPLEX_TYPES = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
Exporter = Literal["legacy", "dynamo"]


class _View(nn.Module):
    """A recurrent view (`step` or `chunk`) as a module with flat outputs, for the exporter."""

    def __init__(self, rec: RecurrentNetwork, view: str) -> None:
        super().__init__()
        self.rec, self.view = rec, view

    def forward(self, samples: torch.Tensor, state: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, ...]:
        y, new_state = getattr(self.rec, self.view)(samples, list(state))
        return (y, *new_state)


def state_names(rec: RecurrentNetwork) -> list[str]:
    return [name for name, _, _ in rec.state_spec]


def fingerprint(net: S4Network) -> str:
    """sha256 of the config and every weight, so cached graphs can be matched to a checkpoint."""
    digest = hashlib.sha256(net.config.model_dump_json().encode())
    for key, value in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _export_graph(rec: RecurrentNetwork, view: str, path: Path, block: int | None,
                  exporter: Exporter) -> None:
    batch = 2  # any size > 1: a batch of 1 could be specialised by the tracer
    shape = (batch, rec.config.d_input) if block is None else (batch, block, rec.config.d_input)
    samples = torch.zeros(shape)
    state = tuple(rec.initial_state(batch))
    names = state_names(rec)
    input_names = [SAMPLES, *names]
    output_names = [OUTPUTS, *(NEXT_PREFIX + n for n in names)]
    if exporter == "dynamo":
        dim = torch.export.Dim("batch")
        options: dict[str, Any] = dict(
            dynamo=True, external_data=False, verbose=False,
            dynamic_shapes={"samples": {0: dim}, "state": tuple({0: dim} for _ in state)})
    else:
        options = dict(dynamo=False,
                       dynamic_axes={n: {0: "batch"} for n in input_names + output_names})
    with torch.no_grad():
        torch.onnx.export(_View(rec, view).eval(), (samples, state), str(path),
                          input_names=input_names, output_names=output_names,
                          opset_version=OPSET, **options)


def check_graph(path: str | Path) -> onnx.ModelProto:
    """onnx.checker (full) plus: no complex tensor anywhere. Returns the loaded model."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
    complex_values = [v.name for v in values if v.type.tensor_type.elem_type in COMPLEX_TYPES]
    complex_values += [t.name for t in inferred.graph.initializer if t.data_type in COMPLEX_TYPES]
    if complex_values:
        raise ValueError(f"{path}: complex tensors in the graph: {complex_values[:5]}")
    return model


def _as_network(model_dir_or_net: str | Path | S4Network) -> S4Network:
    if isinstance(model_dir_or_net, S4Network):
        return model_dir_or_net.to("cpu").eval()
    return load_model(model_dir_or_net)


def _check_block(net: S4Network, block: int) -> None:
    if block < 1:
        raise ValueError(f"chunk length must be >= 1, got {block}")
    if net.config.layer == "s4" and block & (block - 1):
        raise ValueError(f"chunk length must be a power of two for S4, got {block}")


def export_onnx(model_dir_or_net: str | Path | S4Network, out_dir: str | Path,
                rate: float = 1.0, chunk: int | None = None,
                extra_chunks: tuple[int, ...] = (), exporter: Exporter = "legacy",
                check: bool = True) -> dict[str, Path]:
    """Export a model's step and chunk graphs (and manifest) into `out_dir`.

    model_dir_or_net: a model directory (config.json + model.safetensors) or an S4Network.
    rate: dt scale baked into the graphs (session sample rate / model sample rate).
    chunk: block length T of chunk.onnx; default min(config.chunk_max, 64). Must be a power of
        two for S4. Lengths above 64 trace a Toeplitz product, whose cost grows as T².
    extra_chunks: further block lengths, written as chunk_<t>.onnx (the onnx backend uses a
        ladder of them to serve frames of any length).
    exporter: "legacy" (TorchScript-based, about a second per graph) or "dynamo" (torch.export
        + onnxscript, slower to export, same graph semantics).
    check: run onnx.checker and the no-complex-types check on every graph.

    Returns {"step": path, "chunk": path, "chunk_<t>": path..., "manifest": path}.
    """
    net = _as_network(model_dir_or_net)
    block = chunk or min(net.config.chunk_max, DEFAULT_CHUNK)
    blocks = sorted({block, *extra_chunks}, reverse=True)
    for t in blocks:
        _check_block(net, t)
    rec = net.to_recurrent(rate, chunk_max=block)  # refuses a rate that is no positive number
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"step": out / "step.onnx"}
    _export_graph(rec, "step", paths["step"], None, exporter)
    chunk_files: dict[str, str] = {}
    for t in blocks:
        key = "chunk" if t == block else f"chunk_{t}"
        paths[key] = out / f"{key}.onnx"
        # Tables sized to the block: a graph embeds its tables whole.
        _export_graph(net.to_recurrent(rate, chunk_max=t), "chunk", paths[key], t, exporter)
        chunk_files[str(t)] = paths[key].name
    if check:
        for path in paths.values():
            check_graph(path)
    paths["manifest"] = out / MANIFEST_FILE
    manifest = build_manifest(net, rec, rate, block, chunk_files, exporter)
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def build_manifest(net: S4Network, rec: RecurrentNetwork, rate: float, block: int,
                   chunk_files: dict[str, str], exporter: Exporter) -> dict[str, Any]:
    cfg = net.config
    names = state_names(rec)
    return {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
        "model": cfg.name, "version": str(cfg.version), "layer": cfg.layer, "task": cfg.task,
        "d_input": cfg.d_input, "d_output": cfg.d_output,
        "rate": float(rate), "chunk": block, "chunks": chunk_files, "step": "step.onnx",
        "opset": OPSET, "exporter": exporter, "torch": torch.__version__,
        "fingerprint": fingerprint(net),
        "inputs": [SAMPLES, *names], "outputs": [OUTPUTS, *(NEXT_PREFIX + n for n in names)],
        "state_spec": [{"name": n, "shape": list(s), "dtype": str(d).removeprefix("torch.")}
                       for n, s, d in rec.state_spec],
        "state_bytes": rec.state_bytes,
    }


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of an export directory, or None when absent or of another format."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if (manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("format_version") != MANIFEST_VERSION):
        return None
    return manifest
