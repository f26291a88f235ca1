"""Load-test results for people (a rich table) and machines (JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadtest.predict_load import PredictResult
from loadtest.stream_load import StreamResult


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _latency_rows(table: Table, label: str, lat: dict) -> None:
    table.add_row(
        f"{label} latency ms p50/p90/p99/max",
        " / ".join(_ms(lat.get(k)) for k in ("p50", "p90", "p99", "max")),
    )


def stream_table(result: StreamResult) -> Table:
    cfg, c, tp = result.config, result.counts, result.throughput
    verdict = "[green]PASS[/]" if result.ok else "[red]FAIL[/]"
    table = Table(title=f"stream load: {cfg['model']} @ {cfg['url']}  {verdict}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("sessions (connected/asked)", f"{c.get('connected', 0)}/{c.get('sessions', 0)}")
    table.add_row("frame × rate × wire", f"{cfg['frame']} × {cfg['rate']:g}/s × {cfg['wire']}")
    table.add_row(
        "frames sent / answered ok", f"{c.get('frames_sent', 0)} / {c.get('replies_ok', 0)}"
    )
    table.add_row(
        "lost / dup / wrong",
        " / ".join(str(c.get(k, 0)) for k in ("lost", "duplicated", "wrong")),
    )
    table.add_row(
        "hold frames/s (offered)", f"{tp['frames_per_s']:.0f} ({tp['offered_frames_per_s']:.0f})"
    )
    table.add_row("hold samples/s", f"{tp['samples_per_s']:.0f}")
    _latency_rows(table, "hold", result.latency_hold_ms)
    _latency_rows(table, "all", result.latency_ms)
    table.add_row("client max send lag ms", _ms(result.client["max_send_lag_ms"]))
    v = result.verify
    table.add_row(
        "verified sessions (failed), max err",
        f"{v['sessions']} ({v['failed']}), {_err(v['max_abs_err'])}",
    )
    for code, n in sorted(result.errors.items()):
        table.add_row(f"error {code}", str(n))
    _server_rows(table, result.server)
    return table


def _server_rows(table: Table, server: dict) -> None:
    if not server.get("available"):
        table.add_row("server /metrics", "no s4serve_ metrics")
        return
    batch = server.get("step_batch_size")
    if batch:
        table.add_row("server step batch mean/p99", f"{batch['mean']:.1f} / {_ms(batch['p99'])}")
    for kind, hist in (server.get("step_seconds") or {}).items():
        if hist:
            table.add_row(
                f"server {kind} ms mean/p99",
                f"{hist['mean'] * 1e3:.3f} / {_ms(_x1000(hist['p99']))}",
            )
    lat = server.get("frame_latency")
    if lat:
        table.add_row(
            "server frame latency ms mean/p99",
            f"{lat['mean'] * 1e3:.2f} / {_ms(_x1000(lat['p99']))}",
        )
    if server.get("queue_depth_max") is not None:
        table.add_row(
            "server queue depth mean/max",
            f"{server['queue_depth_mean']:.1f} / {server['queue_depth_max']:.0f}",
        )


def _err(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _x1000(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def predict_table(result: PredictResult) -> Table:
    cfg = result.config
    verdict = "[green]PASS[/]" if result.ok else "[red]FAIL[/]"
    table = Table(title=f"predict load: {cfg['model']} @ {cfg['url']}  {verdict}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        "batch × length, concurrency", f"{cfg['batch']} × {cfg['length']}, {cfg['concurrency']}"
    )
    table.add_row("requests (ok)", f"{result.requests} ({result.requests_ok})")
    for key, value in result.throughput.items():
        table.add_row(key.replace("_", " "), f"{value:.1f}")
    _latency_rows(table, "request", result.latency_ms)
    for code, n in sorted(result.errors.items()):
        table.add_row(f"error {code}", str(n))
    return table


def print_result(result: StreamResult | PredictResult, console: Console | None = None) -> None:
    console = console or Console()
    table = stream_table(result) if isinstance(result, StreamResult) else predict_table(result)
    console.print(table)
    for failure in result.failures:
        console.print(f"[red]failure:[/] {failure}")


def write_json(result: StreamResult | PredictResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_json(), indent=2, default=str))
