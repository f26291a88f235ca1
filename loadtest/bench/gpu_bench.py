"""The CUDA path: a batch of long sequences through the reference network, vs the CPU result."""

from __future__ import annotations

import torch

from loadtest.bench.networks import perturbed_network
from loadtest.bench.timing import time_call
from model.network import S4Network


def _synced(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


@torch.no_grad()
def run_gpu_bench(quick: bool, log=print) -> dict:
    """Conv forward of (64, 16000) on cuda:0, cold and warm, and its max abs error vs CPU."""
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device here (torch.cuda.is_available())"}
    batch, length = (4, 512) if quick else (64, 16_000)
    results: dict = {"available": True, "device": torch.cuda.get_device_name(0),
                     "batch": batch, "length": length}  # fmt: skip
    for layer in ("s4d", "s4"):
        log(f"gpu bench {layer}: {batch} × {length}")
        net = perturbed_network(layer)
        u = torch.randn(batch, length, 1)
        cpu_out = net(u)
        gpu_net = S4Network(net.config)  # a twin: the CPU network stays as the reference
        gpu_net.load_state_dict(net.state_dict())
        gpu_net = gpu_net.to("cuda:0").eval()
        u_gpu = u.to("cuda:0")
        cold = time_call(_synced(lambda net=gpu_net, u=u_gpu: net(u)), repeats=1, warmup=0)
        warm = time_call(_synced(lambda net=gpu_net, u=u_gpu: net(u)), repeats=5)
        err = float((gpu_net(u_gpu).cpu().double() - cpu_out.double()).abs().max())
        results[layer] = {"cold": cold.as_dict(), "warm": warm.as_dict(), "max_abs_err_vs_cpu": err}
    return results
