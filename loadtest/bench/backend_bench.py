"""Backend benches: step latency of each server runtime (torch, onnx) at B=1 and B=1024."""

from __future__ import annotations

from pathlib import Path

import torch

from loadtest.bench.networks import perturbed_network
from loadtest.bench.timing import inner_for, time_call
from model.checkpoint import save_model

BACKENDS = ("torch", "onnx")


def run_backend_benches(scratch: Path, quick: bool, log=print) -> dict:
    """Same reference-size S4D model through every backend that can be loaded here."""
    from server.backends.base import load_backend

    torch.set_num_threads(1)
    shape = dict(d_model=16, n_layers=2, d_state=16) if quick else {}
    model_dir = save_model(perturbed_network("s4d", **shape), scratch / "backend-bench")
    target_s, repeats = (0.02, 3) if quick else (0.3, 7)
    results: dict = {}
    for kind in BACKENDS:
        log(f"backend bench {kind}")
        try:
            backend = load_backend(kind, model_dir, "cpu")
        except (ImportError, ModuleNotFoundError) as exc:
            results[kind] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
            continue
        except Exception as exc:  # a backend that exists but cannot load this model
            results[kind] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
            continue
        entry: dict = {"available": True}
        for b in (1, 1024):
            state = backend.initial_state(b)
            u = torch.randn(b, backend.info.d_input)
            call = lambda backend=backend, u=u, state=state: backend.step(u, state, 1.0)  # noqa: E731
            entry[b] = time_call(call, repeats, inner_for(target_s, call)).as_dict()
        results[kind] = entry
    if results.get("onnx", {}).get("available") and results["torch"].get("available"):
        results["onnx_vs_torch"] = {
            b: results["onnx"][b]["median_s"] / results["torch"][b]["median_s"] for b in (1, 1024)
        }
    return results
