"""Model benches: recurrent step, chunk and convolution times, accuracy, and the O(N) check."""

from __future__ import annotations

from pathlib import Path

import torch

from loadtest.bench.networks import perturbed_network
from loadtest.bench.timing import inner_for, time_call
from model.aot_step import AotStep
from model.fused import StateLayout, inductor_available
from model.native_step import NativeStep, unsupported
from model.network import S4Network
from model.reference import reference_outputs

# the server's default compile_cache: a bench run after `make serve` reuses its packages
COMPILE_CACHE = Path("var/compiled")

# Official per-layer anchors (the state-spaces/s4 code on this machine, 1 thread; BENCHMARKS.md
# states them with the results), seconds.
STEP_ANCHOR_S = {"s4d": 500e-6, "s4": 2.04e-3}  # S4D step; S4 Woodbury ("linear") step, B=1
CONV_ANCHOR_S = {"s4d": 7.4, "s4": 5.4}  # block forward at L=16000
ACCURACY_GOAL = {"s4d": 1e-4, "s4": 2e-4}
# The official S4D step at B=1024, one layer H=128, N=64, 1 thread (measured for issue #9).
OFFICIAL_STEP_B1024_S = {"s4d": 101e-3}


def _clear_kernels(net: S4Network) -> None:
    for block in net.blocks:
        block.layer.clear_kernel_cache()


def step_times(net: S4Network, batches: tuple[int, ...], target_s: float, repeats: int,
               compiler: str = "torchscript") -> dict:
    """Whole-network recurrent step time per batch size, as the torch backend runs it
    (`compiled_step`, TorchScript by default; "eager" is the plain Python step)."""
    rec = net.to_recurrent()
    step = rec.compiled_step(compiler)
    out = {}
    with torch.no_grad():
        for b in batches:
            state = rec.initial_state(b)
            u = torch.randn(b, net.config.d_input)
            call = lambda u=u, state=state: step(u, state)  # noqa: E731
            call()  # first call compiles (inductor)
            out[b] = time_call(call, repeats, inner_for(target_s, call)).as_dict()
    return out


def served_step_times(net: S4Network, batches: tuple[int, ...], target_s: float,
                      repeats: int, compiler: str = "auto") -> dict:
    """The step as the server runs it (`step_compiler` auto): flat state rows, the rate's
    tables as inputs; the native C step for S4D (rows advanced in place), else one
    AOTInductor package, else TorchScript when no compiler is installed. `compiler` "aoti":
    the package even where the native step serves (what it replaced, in the same run)."""
    rec = net.to_recurrent()
    layout = StateLayout.of(rec.state_spec)
    fused = None
    if compiler == "auto" and unsupported(rec) is None:
        fused, compiler = NativeStep(rec, layout, COMPILE_CACHE), "native"
    elif inductor_available():
        fused, compiler = AotStep(rec, layout, COMPILE_CACHE), "aoti"
    else:
        compiler = "torchscript"
    step = rec.compiled_step("torchscript")
    out: dict = {"compiler": compiler}
    with torch.no_grad():
        for b in batches:
            flat32, flat64 = layout.join(rec.initial_state(b))
            u = torch.randn(b, net.config.d_input)
            if fused is not None:
                call = lambda u=u, a=flat32, c=flat64: fused(rec, u, a, c)  # noqa: E731
            else:
                call = lambda u=u, a=flat32, c=flat64: layout.join(  # noqa: E731
                    step(u, layout.split(a, c))[1])
            call()
            out[b] = time_call(call, repeats, inner_for(target_s, call)).as_dict()
        if compiler == "native":  # a block of T samples is T steps in one call (B=1)
            for t in (32, 320):
                flat32, flat64 = layout.join(rec.initial_state(1))
                u = torch.randn(1, t, net.config.d_input)
                call = lambda u=u, a=flat32, c=flat64: fused.chunk(rec, u, a, c)  # noqa: E731
                out[f"chunk_{t}"] = time_call(call, repeats, inner_for(target_s, call)).as_dict()
    return out


def roofline_pass(net: S4Network, batch: int, target_s: float, repeats: int) -> dict:
    """One read and one write of `batch` sessions' whole state (a copy between two buffers):
    the least memory traffic any step must do."""
    rec = net.to_recurrent()
    src32, src64 = StateLayout.of(rec.state_spec).join(rec.initial_state(batch))
    dst32, dst64 = torch.empty_like(src32), torch.empty_like(src64)

    def call() -> None:
        dst32.copy_(src32)
        dst64.copy_(src64)

    out = time_call(call, repeats, inner_for(target_s, call)).as_dict()
    out["bytes"] = 2 * (src32.numel() * 4 + src64.numel() * 8)
    return out


def chunk_time(net: S4Network, length: int, target_s: float, repeats: int) -> dict:
    rec = net.to_recurrent()
    state = rec.initial_state(1)
    u = torch.randn(1, length, net.config.d_input)
    call = lambda: rec.chunk(u, state)  # noqa: E731
    return time_call(call, repeats, inner_for(target_s, call)).as_dict()


@torch.no_grad()
def conv_times(net: S4Network, length: int, repeats: int) -> dict:
    """Convolutional forward at one length: cold (kernels recomputed) and warm (cached)."""
    u = torch.randn(1, length, net.config.d_input)

    def cold() -> None:
        _clear_kernels(net)
        net(u)

    return {
        "cold": time_call(cold, repeats=max(1, repeats // 3), warmup=0).as_dict(),
        "warm": time_call(lambda: net(u), repeats, warmup=1).as_dict(),
    }


@torch.no_grad()
def accuracy(net: S4Network, length: int, chunk: int = 320, seed: int = 0) -> dict:
    """Max abs error of step, chunk and conv outputs vs the float64 dense reference."""
    torch.manual_seed(seed)
    u = torch.randn(1, length, net.config.d_input)
    ref = reference_outputs(net, u)
    rec = net.to_recurrent()
    state = rec.initial_state(1)
    steps = []
    for t in range(length):
        y, state = rec.step(u[:, t], state)
        steps.append(y)
    step_out = torch.stack(steps, dim=1)
    state = rec.initial_state(1)
    chunks = []
    for start in range(0, length, chunk):
        y, state = rec.chunk(u[:, start : start + chunk], state)
        chunks.append(y)
    chunk_out = torch.cat(chunks, dim=1)
    conv_out = net(u)

    def err(y: torch.Tensor) -> float:
        return float((y.double() - ref).abs().max())

    return {"length": length, "step": err(step_out), "chunk": err(chunk_out), "conv": err(conv_out)}


def state_scaling(
    layer: str, sizes: tuple[int, ...], batch: int, target_s: float, repeats: int, d_model: int
) -> list[dict]:
    """Step time vs state size N: per state element it should stay roughly flat (O(N))."""
    rows = []
    for n in sizes:
        net = perturbed_network(layer, d_state=n, d_model=d_model)
        t = step_times(net, (batch,), target_s, repeats)[batch]
        elements = batch * net.config.n_layers * d_model * n // 2
        rows.append({"d_state": n, "batch": batch, **t,
                     "ns_per_state_element": 1e9 * t["median_s"] / elements})  # fmt: skip
    return rows


def run_model_benches(quick: bool, log=print) -> dict:
    """Everything for the reference size (or small sizes in quick mode), S4D and S4."""
    torch.set_num_threads(1)  # the official anchors are single-threaded
    conv_len = 512 if quick else 16_000
    acc_len = 256 if quick else 16_000
    sizes = (16, 32) if quick else (16, 32, 64, 128, 256)
    shape = dict(d_model=16, n_layers=2, d_state=16) if quick else {}
    target_s, repeats = (0.02, 3) if quick else (0.3, 7)
    results: dict = {"threads": 1, "conv_length": conv_len, "accuracy_length": acc_len}
    for layer in ("s4d", "s4"):
        net = perturbed_network(layer, **shape)
        log(f"model bench {layer}: step")
        entry = {"config": {k: getattr(net.config, k) for k in ("n_layers", "d_model", "d_state")},
                 "step": step_times(net, (1, 1024), target_s, repeats),
                 "step_variants": {c: step_times(net, (1, 1024), target_s, repeats, c)
                                   for c in (("eager",) if quick else ("eager", "inductor"))},
                 "chunk_320": chunk_time(net, 320, target_s, repeats)}  # fmt: skip
        log(f"model bench {layer}: served step and the memory roofline pass")
        entry["served_step"] = served_step_times(net, (1, 1024), target_s, repeats)
        if entry["served_step"]["compiler"] == "native" and inductor_available():
            entry["served_step_aoti"] = served_step_times(net, (1, 1024), target_s, repeats,
                                                          "aoti")
        entry["roofline_1024"] = roofline_pass(net, 1024, target_s, repeats)
        log(f"model bench {layer}: conv L={conv_len}")
        entry["conv"] = conv_times(net, conv_len, repeats)
        log(f"model bench {layer}: accuracy L={acc_len}")
        entry["accuracy"] = accuracy(net, acc_len)
        entry["accuracy"]["goal"] = ACCURACY_GOAL[layer]
        log(f"model bench {layer}: state scaling")
        entry["scaling"] = state_scaling(layer, sizes, 64, target_s, repeats,
                                         shape.get("d_model", 128))  # fmt: skip
        per_layer_step = entry["step"][1]["median_s"] / net.config.n_layers
        per_layer_conv = entry["conv"]["cold"]["median_s"] / net.config.n_layers
        entry["ratios"] = {
            "step_per_layer_vs_anchor": per_layer_step / STEP_ANCHOR_S[layer],
            "conv_cold_per_layer_vs_anchor": per_layer_conv / CONV_ANCHOR_S[layer]
            if not quick
            else None,
        }
        results[layer] = entry
    return results
