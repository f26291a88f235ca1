"""The convolutional view at batch scale: B=64 x L=16000 through the reference network (in
pieces bounded by predict_memory_mb, and in one piece), its GFLOP/s against this machine's
measured GEMM and FFT rates, its peak memory, and B=64 vs B=1 requests over a real server."""

from __future__ import annotations

import io
import math
import multiprocessing
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from loadtest.bench.networks import perturbed_network, served_model
from loadtest.bench.timing import inner_for, time_call
from loadtest.processes import ServerProcess
from model.kernels import fft_size
from server.heap import fix_heap, rss_bytes, without_mkl_buffers
from server.predict_job import Limits
from server.workers import cpu_cores

MEMORY_MB = 256  # the predict_memory_mb default


def ceilings(length: int, channels: int) -> dict:
    """GFLOP/s of a float32 GEMM (1024³) and of rfft+irfft pairs at this size, 1 thread."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gemm = time_call(lambda: a @ b, 5, inner_for(0.2, lambda: a @ b)).median_s
    n = fft_size(length)
    x = torch.randn(channels, length)

    def fft() -> None:
        torch.fft.irfft(torch.fft.rfft(x, n=n), n=n)

    fft_s = time_call(fft, 5, inner_for(0.2, fft)).median_s
    return {"gemm_gflops": 2 * 1024**3 / gemm / 1e9,
            "fft_gflops": fft_flops(n, channels) / fft_s / 1e9, "fft_size": n}


def fft_flops(n: int, channels: int) -> float:
    """A real FFT of n points counted as 2.5·n·log2(n) flops (half a complex one); a pair."""
    return 2 * 2.5 * n * math.log2(n) * channels


def network_flops(d_model: int, n_layers: int, length: int) -> dict:
    """Per sequence: the FFT part and the GEMM part (output linear H -> 2H) of every layer."""
    n = fft_size(length)
    return {"fft": n_layers * (fft_flops(n, d_model) + 6 * (n // 2 + 1) * d_model),
            "gemm": n_layers * 2 * length * d_model * 2 * d_model}


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux: clear_refs 5 resets VmHWM), so the peak read
    after a run is that run's, not the warm-up's."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _batch_run(layer: str, batch: int, length: int, max_batch: int | None, threads: int,
               shape: dict, out) -> None:
    """In a fresh process, so that its peak RSS is this run's alone; its heap and its pass
    threads as a predict worker's."""
    torch.set_num_threads(1)
    fix_heap(MEMORY_MB << 20)
    net = perturbed_network(layer, **shape)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    with torch.no_grad():
        net.predict(torch.randn(1, length, 1))  # kernels cached (warm), buffers touched
    u = torch.randn(batch, length, 1)
    before = rss_bytes()
    _reset_peak()
    began = time.perf_counter()
    net.predict(u, max_batch=max_batch, pool=pool)
    seconds = time.perf_counter() - began
    peak = _peak_bytes()
    out.send({"seconds": seconds, "peak_rss_over_start": max(0, peak - before)})


def batch_conv(layer: str, batch: int, length: int, max_batch: int | None, threads: int,
               shape: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")
    without_mkl_buffers()  # as the server does for its predict workers
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_batch_run,
                        args=(layer, batch, length, max_batch, threads, shape, send))
    child.start()
    result = receive.recv()
    child.join()
    return result


def run_conv_benches(scratch: Path, quick: bool, log=print) -> dict:
    batch, length = (4, 2000) if quick else (64, 16_000)
    shape = dict(n_layers=2, d_model=16, d_state=16) if quick else {}  # quick: a smoke test
    net = perturbed_network("s4d", **shape)
    cfg = net.config
    per_sequence = net.conv_bytes(length)
    cores = cpu_cores()
    # passes as a predict worker sizes them (the settings' defaults), on 1 thread and on all
    pieces = Limits(1, memory_bytes=MEMORY_MB << 20).pass_size(per_sequence)
    side_by_side = Limits(1, memory_bytes=MEMORY_MB << 20, threads=cores).pass_size(per_sequence)
    torch.set_num_threads(1)
    results: dict = {"network": f"{cfg.n_layers} × {cfg.d_model}, N={cfg.d_state}",
                     "batch": batch, "length": length, "threads": 1, "memory_mb": MEMORY_MB,
                     "pass_mb": Limits(1).pass_bytes >> 20, "cores": cores,
                     "conv_bytes_per_sequence": per_sequence, "sequences_per_pass": pieces,
                     "ceilings": ceilings(length, cfg.d_model),
                     "flops_per_sequence": network_flops(cfg.d_model, cfg.n_layers, length)}
    flops = results["flops_per_sequence"]
    ceiling = results["ceilings"]
    # the best this machine could do with both parts at their measured rates
    best_s = (flops["fft"] / ceiling["fft_gflops"] + flops["gemm"] / ceiling["gemm_gflops"]) / 1e9
    for layer in ("s4d", "s4"):
        results[layer] = {}
        runs = [("pieces", pieces, 1), ("one_pass", None, 1)]
        if cores > 1:
            runs.insert(1, (f"pieces on {cores} threads", side_by_side, cores))
        for label, max_batch, threads in runs:
            log(f"conv bench {layer}: {batch} × {length}, {label}")
            run = batch_conv(layer, batch, length, max_batch, threads, shape)
            total = (flops["fft"] + flops["gemm"]) * batch
            run.update(samples_per_s=batch * length / run["seconds"],
                       gflops=total / run["seconds"] / 1e9,
                       of_ceiling=best_s * batch / run["seconds"] / threads)
            results[layer][label] = run
    digits_dir, kind = served_model("digits", scratch)
    log("conv bench: predict B=1 vs B=64 over the server (digits, .npy)")
    with ServerProcess.s4serve([digits_dir], log_path=scratch / "s4serve-conv.log") as server:
        results["server"] = {"model": kind, **server_batching(server.url, "digits", quick)}
    return results


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def server_batching(url: str, model: str, quick: bool) -> dict:
    """Per-sample throughput of B=64 requests vs B=1 requests (sequential, .npy both ways)."""
    length, batch = (2000, 8) if quick else (16_000, 64)
    rng = np.random.default_rng(0)
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    one = _npy(rng.standard_normal((1, length, 1)).astype(np.float32) * 0.1)
    many = _npy(rng.standard_normal((batch, length, 1)).astype(np.float32) * 0.1)
    with httpx.Client(base_url=url, timeout=600, headers=headers) as http:
        path = f"/v1/models/{model}/predict"

        def post(body: bytes) -> None:
            reply = http.post(path, content=body)
            reply.raise_for_status()

        post(one)  # warm: kernel cached, worker started
        single = time_call(lambda: post(one), repeats=3 if quick else 5, inner=4)
        batched = time_call(lambda: post(many), repeats=2 if quick else 3, warmup=1)
    per_sample_1 = length / single.median_s
    per_sample_b = batch * length / batched.median_s
    return {"length": length, "batch": batch, "b1": single.as_dict(), "batched": batched.as_dict(),
            "samples_per_s_b1": per_sample_1, "samples_per_s_batched": per_sample_b,
            "batched_vs_b1": per_sample_b / per_sample_1}
