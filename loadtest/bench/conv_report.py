"""BENCHMARKS.md section for the convolution benches (loadtest/bench/conv_bench.py)."""

from __future__ import annotations

from loadtest.bench.model_bench import CONV_ANCHOR_S


def _per_layer_speedups(model: dict | None) -> list[str]:
    """Official per-layer block forward / ours, warm and cold, from the model section."""
    if not model or model.get("conv_length") != 16_000:  # the anchors are at L = 16000
        return []
    lines = ["| layer | warm conv: official / ours per layer (goal ≥ 100) "
             "| cold: official / ours (goal ≥ 10) |", "|---|---|---|"]
    for layer in ("s4d", "s4"):
        e = model.get(layer)
        if not e or "conv" not in e:
            continue
        n = e["config"]["n_layers"]
        warm = CONV_ANCHOR_S[layer] / (e["conv"]["warm"]["median_s"] / n)
        cold = CONV_ANCHOR_S[layer] / (e["conv"]["cold"]["median_s"] / n)
        lines.append(f"| {layer} | {warm:.0f}x | {cold:.1f}x |")
    return [*lines, ""]


def render_conv(r: dict, model: dict | None = None) -> list[str]:
    ceiling = r["ceilings"]
    lines = [
        "## Convolution view at batch scale", "",
        f"Network {r['network']}, B={r['batch']} × L={r['length']}, "
        f"{r['threads']} torch thread, kernels cached; each run in a fresh process (peak RSS "
        "is its own). Measured ceilings in the same run: float32 GEMM "
        f"{ceiling['gemm_gflops']:.1f} GFLOP/s, rfft+irfft pairs at n={ceiling['fft_size']} "
        f"{ceiling['fft_gflops']:.1f} GFLOP/s; 'of ceiling' = the time the FFT and GEMM work "
        "would take at those rates (on as many threads as the run) / the time taken. `pieces` "
        f"= the passes of a predict worker (predict_pass_mb {r.get('pass_mb', '-')} MB, "
        f"predict_memory_mb {r['memory_mb']} MB): {r['sequences_per_pass']} sequences per pass "
        f"(estimated {r['conv_bytes_per_sequence'] / 2**20:.0f} MB each); `pieces on N "
        "threads`: the same passes side by side, as a worker runs them on N cores.", "",
        *_per_layer_speedups(model),
        "| layer | run | time | samples/s | GFLOP/s | of ceiling | peak RSS over start |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for layer in ("s4d", "s4"):
        for label, run in r[layer].items():
            lines.append(f"| {layer} | {label} | {run['seconds']:.2f} s | "
                         f"{run['samples_per_s'] / 1e3:.0f}k | {run['gflops']:.1f} | "
                         f"{100 * run['of_ceiling']:.0f} % | "
                         f"{run['peak_rss_over_start'] / 2**20:.0f} MB |")
    s = r.get("server")
    if s:
        lines += ["", f"Over a real server (`{s['model']}` digits model, .npy, L={s['length']}): "
                  f"B=1 requests {s['samples_per_s_b1'] / 1e3:.0f}k samples/s, one B={s['batch']} "
                  f"request {s['samples_per_s_batched'] / 1e3:.0f}k samples/s: "
                  f"**{s['batched_vs_b1']:.2f}x** the per-sample throughput (goal ≥ 2)."]
    return lines
