"""PNG of a streaming run: latency over time (per-second p50/p99, every frame) and histogram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt
import numpy as np

from loadtest.stream_load import StreamResult

MAX_SCATTER_POINTS = 50_000


def plot_stream(result: StreamResult, path: str | Path) -> None:
    lat_ms = result.latency_s * 1e3 if result.latency_s is not None else np.zeros(0)
    sent = result.sent_at_s if result.sent_at_s is not None else np.zeros(0)
    fig, (ax_time, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.5))
    if lat_ms.size:
        step = max(1, lat_ms.size // MAX_SCATTER_POINTS)
        ax_time.scatter(sent[::step], lat_ms[::step], s=2, alpha=0.25, color="grey", label="frames")
        tl = result.timeline
        ax_time.plot(np.asarray(tl["t"]) + 0.5, tl["p50_ms"], label="p50 per s")
        ax_time.plot(np.asarray(tl["t"]) + 0.5, tl["p99_ms"], label="p99 per s")
        lo = max(lat_ms.min(), 1e-3)
        bins = np.logspace(np.log10(lo), np.log10(max(lat_ms.max(), lo * 1.01)), 60)
        ax_hist.hist(lat_ms, bins=bins, color="tab:blue")
        ax_hist.set_xscale("log")
        for p in ("p50", "p99"):
            value = result.latency_ms[p]
            ax_hist.axvline(value, ls="--", color="k", lw=0.8)
            ax_hist.text(value, ax_hist.get_ylim()[1] * 0.9, f" {p} {value:.2f}", fontsize=8)
    cfg = result.config
    ramp_end = cfg["ramp_s"]
    ax_time.axvspan(ramp_end, ramp_end + cfg["hold_s"], color="tab:green", alpha=0.07, label="hold")
    ax_time.set(xlabel="send time (s from start)", ylabel="send → reply latency (ms)", yscale="log")
    ax_time.legend(loc="upper left", fontsize=8)
    ax_hist.set(xlabel="latency (ms)", ylabel="frames")
    fig.suptitle(
        f"{cfg['model']}: {cfg['sessions']} sessions × {cfg['rate']:g} samples/s, "
        f"frames of {cfg['frame']} ({cfg['wire']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
