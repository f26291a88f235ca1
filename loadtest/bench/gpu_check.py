"""`make gpu-check`: everything a person with a GPU should verify, in one go (< 5 minutes).

1. Correctness on the device: the reference network (S4D and S4) through the conv view and the
   recurrence on the device vs the float64 dense reference (model/reference.py).
2. Speed: B=64 x L=16000 through the reference network on the device, warm kernels, with and
   without the host -> device copy of the inputs (pinned), against the 20 ms goal.
3. A real server on `--device DEVICE`: a stream and a predict of the same signal agree, and
   a B=64 predict over HTTP is timed.

Prints a markdown summary (paste it into BENCHMARKS.md) and exits 1 if a check fails.
`--device cpu --quick` runs the same script without a GPU (what the test suite does).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loadtest.bench.networks import perturbed_network
from loadtest.processes import ServerProcess
from model.checkpoint import save_model
from model.network import S4Network
from model.reference import reference_outputs

GOAL_B64_S = 0.020
TOLERANCE = {"s4d": 1e-4, "s4": 2e-4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` on the device (after one warm-up call)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


@torch.no_grad()
def correctness(layer: str, device: torch.device, length: int, shape: dict) -> dict:
    net = perturbed_network(layer, **shape)
    u = torch.randn(2, length, 1)
    ref = reference_outputs(net, u)
    on_device = S4Network(net.config)
    on_device.load_state_dict(net.state_dict())
    on_device = on_device.to(device).eval()
    conv = on_device(u.to(device)).cpu().double()
    rec = on_device.to_recurrent()
    chunk, _ = rec.chunk(u.to(device), rec.initial_state(2, device))
    errors = {"conv": float((conv - ref).abs().max()),
              "chunk": float((chunk.cpu().double() - ref).abs().max())}
    return {**errors, "goal": TOLERANCE[layer], "ok": max(errors.values()) <= TOLERANCE[layer]}


@torch.no_grad()
def batch_speed(layer: str, device: torch.device, batch: int, length: int, shape: dict
                ) -> dict:
    net = perturbed_network(layer, **shape).to(device).eval()
    host = torch.randn(batch, length, 1)
    if device.type == "cuda":
        host = host.pin_memory()
    resident = host.to(device)
    net(resident)  # kernels generated and cached on the device
    return {"device_resident_s": _timed(lambda: net(resident), device, 10),
            "with_copy_s": _timed(lambda: net(host.to(device, non_blocking=True)), device, 10),
            "goal_s": GOAL_B64_S}


def over_server(device: str, scratch: Path, batch: int, length: int, shape: dict) -> dict:
    from client import Client

    net = perturbed_network("s4d", name="gpucheck", sample_rate=16000.0, **shape)
    model_dir = save_model(net, scratch / "gpucheck")
    signal = np.random.default_rng(0).standard_normal((2000, 1)).astype(np.float32)
    big = np.random.default_rng(1).standard_normal((batch, length, 1)).astype(np.float32)
    began = time.perf_counter()
    # a cold start on a GPU compiles the step for the device (minutes at most, once per cache)
    with ServerProcess.s4serve([model_dir], extra=["--device", device, "--workers", "1"],
                               log_path=scratch / "server.log", ready_timeout_s=420) as server, \
            Client(server.url, timeout=600) as client:
        startup = time.perf_counter() - began
        info = client.model("gpucheck")
        whole = client.predict("gpucheck", signal[None]).outputs[0]
        sends = []
        with client.stream("gpucheck") as stream:
            pieces = []
            for i in range(0, len(signal), 160):
                sent = time.perf_counter()
                pieces.append(stream.send(signal[i:i + 160]))
                sends.append(time.perf_counter() - sent)
            for i in range(200):  # one sample per frame: the per-sample round trip
                sent = time.perf_counter()
                stream.send(signal[i:i + 1])
                sends.append(time.perf_counter() - sent)
        err = float(np.abs(np.concatenate(pieces) - whole).max())
        client.predict("gpucheck", big[:1])
        began = time.perf_counter()
        client.predict("gpucheck", big)
        seconds = time.perf_counter() - began
    return {"device": info["device"], "stream_vs_predict": err, "ok": err <= 1e-4,
            f"predict_b{batch}_http_s": seconds, "startup_s": startup,
            "chunk160_round_trip_ms": 1e3 * float(np.median(sends[:-200])),
            "sample_round_trip_ms": 1e3 * float(np.median(sends[-200:]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a dry run)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False): nothing to check; "
              "`--device cpu --quick` runs the script without one", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    batch, length = (4, 1000) if args.quick else (64, 16_000)
    ref_length = 256 if args.quick else 2048
    shape = dict(n_layers=2, d_model=16, d_state=16) if args.quick else {}  # quick: small net
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"device": name, "batch": batch, "length": length}
    for layer in ("s4d", "s4"):
        result[layer] = {"correctness": correctness(layer, device, ref_length, shape),
                         "speed": batch_speed(layer, device, batch, length, shape)}
    with tempfile.TemporaryDirectory(prefix="s4serve-gpucheck-") as tmp:
        try:
            result["server"] = over_server(args.device, Path(tmp), batch, length, shape)
        except Exception as exc:  # the in-process checks above still get reported
            log = Path(tmp) / "server.log"
            tail = log.read_text()[-3000:] if log.is_file() else ""
            print(f"server check failed: {exc!r}\n{tail}", file=sys.stderr)
            result["server"] = {"ok": False, "error": repr(exc)}
    ok = result["server"]["ok"] and all(result[k]["correctness"]["ok"] for k in ("s4d", "s4"))
    print(f"## GPU check ({name}), {time.strftime('%Y-%m-%d')}\n")
    print("| layer | conv err | chunk err | goal | B×L conv (on device) | with host copy |")
    print("|---|---|---|---|---|---|")
    for layer in ("s4d", "s4"):
        c, s = result[layer]["correctness"], result[layer]["speed"]
        print(f"| {layer} | {c['conv']:.2e} | {c['chunk']:.2e} | {c['goal']:.0e} | "
              f"{1e3 * s['device_resident_s']:.2f} ms | {1e3 * s['with_copy_s']:.2f} ms |")
    srv = result["server"]
    if "error" in srv:
        print(f"\nServer on {args.device}: FAILED ({srv['error']})")
    else:
        print(f"\nServer on {srv['device']}: stream vs predict {srv['stream_vs_predict']:.2e}; "
              f"B={batch} × L={length} predict over HTTP {srv[f'predict_b{batch}_http_s']:.2f} s; "
              f"stream round trip {srv['chunk160_round_trip_ms']:.2f} ms per 160-sample frame, "
              f"{srv['sample_round_trip_ms']:.2f} ms per one-sample frame; ready after "
              f"{srv['startup_s']:.0f} s (cold compile caches). "
              f"Goal: B=64 × L=16000 conv ≤ {1e3 * GOAL_B64_S:.0f} ms on device.")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    print("\nall checks passed" if ok else "\nCHECKS FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
