"""Command line of the load tester: `python -m loadtest ...` and `s4serve loadtest ...`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from loadtest.config import PredictLoadConfig, StreamLoadConfig, one_line
from loadtest.targets import RemoteTargetError

app = typer.Typer(
    name="loadtest",
    help="Drive a running s4serve (or any server of the same wire contract) and judge it.",
    no_args_is_help=True,
    add_completion=False,
)

URL = Annotated[str, typer.Option(help="server base URL (loopback unless --allow-remote)")]
MODEL = Annotated[str, typer.Option(help="model name")]


def _build(cls: type, **kwargs):
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        raise typer.BadParameter(one_line(exc)) from None


def _finish(result, json_out: Path | None, png_out: Path | None = None) -> None:
    from loadtest.report import print_result, write_json

    print_result(result)
    if json_out:
        write_json(result, json_out)
    if png_out:
        from loadtest.plot import plot_stream

        plot_stream(result, png_out)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def stream(
    url: URL = "http://127.0.0.1:8000",
    model: MODEL = "motion",
    sessions: Annotated[int, typer.Option("--sessions", "-n", help="concurrent sessions")] = 10,
    rate: Annotated[float, typer.Option(help="samples per second per session")] = 100.0,
    frame: Annotated[int, typer.Option("--frame", "-T", help="samples per frame")] = 1,
    wire: Annotated[str, typer.Option(help="float32 | int16 | json")] = "float32",
    signal: Annotated[str, typer.Option(help="sine | noise | npy")] = "sine",
    npy: Annotated[str | None, typer.Option(help="input .npy (implies --signal npy)")] = None,
    ramp: Annotated[float, typer.Option(help="seconds to open all sessions")] = 1.0,
    hold: Annotated[float, typer.Option(help="seconds of full load after the ramp")] = 5.0,
    drain: Annotated[float, typer.Option(help="seconds to wait for late replies")] = 10.0,
    sample_rate: Annotated[float | None, typer.Option(help="session sample rate (Hz)")] = None,
    verify_sessions: Annotated[int, typer.Option(help="sessions checked against predict")] = 2,
    verify_max_samples: Annotated[
        int, typer.Option(help="samples of each verified session compared")] = 4096,
    tolerance: Annotated[
        float, typer.Option(help="largest |stream - predict| of a verified output")] = 1e-4,
    workers: Annotated[int, typer.Option(help="client processes")] = 1,
    engine: Annotated[str, typer.Option(
        help="auto | raw (one lean client for every session of a process) | client (the "
             "client library's AsyncStream per session)")] = "auto",
    allow_remote: Annotated[
        bool, typer.Option(help="allow a target that is not this machine (loopback)")] = False,
    token: Annotated[str | None, typer.Option(envvar="S4SERVE_TOKEN", help="API key")] = None,
    json_out: Annotated[Path | None, typer.Option(help="also write the result as JSON")] = None,
    png_out: Annotated[Path | None, typer.Option(help="also plot the run into this PNG")] = None,
) -> None:
    """N concurrent WebSocket sessions streaming at a fixed rate; every reply is checked."""
    from loadtest.stream_load import run_loop, run_stream_load

    cfg = _build(
        StreamLoadConfig, url=url, model=model, sessions=sessions, rate=rate, frame=frame,
        wire=wire, signal="npy" if npy else signal, npy_path=npy, ramp_s=ramp, hold_s=hold,
        drain_s=drain, sample_rate=sample_rate, verify_sessions=verify_sessions,
        verify_max_samples=verify_max_samples, tolerance=tolerance, workers=workers,
        engine=engine, allow_remote=allow_remote, token=token,
    )  # fmt: skip
    try:
        result = run_loop(run_stream_load(cfg))
    except (RemoteTargetError, RuntimeError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _finish(result, json_out, png_out)


@app.command()
def predict(
    url: URL = "http://127.0.0.1:8000",
    model: MODEL = "motion",
    batch: Annotated[int, typer.Option(help="sequences per request")] = 1,
    length: Annotated[int, typer.Option(help="samples per sequence")] = 1000,
    concurrency: Annotated[int, typer.Option(help="requests in flight at once")] = 1,
    duration: Annotated[float, typer.Option(help="seconds")] = 5.0,
    max_requests: Annotated[int, typer.Option(help="stop after this many requests")] = 100_000,
    body: Annotated[str, typer.Option(help="npy | json")] = "npy",
    allow_remote: Annotated[
        bool, typer.Option(help="allow a target that is not this machine (loopback)")] = False,
    token: Annotated[str | None, typer.Option(envvar="S4SERVE_TOKEN", help="API key")] = None,
    json_out: Annotated[Path | None, typer.Option(help="also write the result as JSON")] = None,
) -> None:
    """Concurrent POST predict calls of batch × length; every answer's shape is checked."""
    from loadtest.predict_load import run_predict_load

    cfg = _build(
        PredictLoadConfig, url=url, model=model, batch=batch, length=length,
        concurrency=concurrency, duration_s=duration, max_requests=max_requests, body=body,
        allow_remote=allow_remote, token=token,
    )  # fmt: skip
    try:
        result = asyncio.run(run_predict_load(cfg))
    except (RemoteTargetError, RuntimeError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _finish(result, json_out)


@app.command()
def mux(
    url: URL = "http://127.0.0.1:8000",
    model: MODEL = "motion",
    gateways: Annotated[int, typer.Option(help="connections, each a gateway")] = 10,
    sessions_per_gateway: Annotated[int, typer.Option(help="sessions on each connection")] = 100,
    rate: Annotated[float, typer.Option(help="messages per second per gateway")] = 100.0,
    frame: Annotated[int, typer.Option(help="samples per session per message")] = 1,
    hold: Annotated[float, typer.Option(help="seconds of load")] = 10.0,
    drain: Annotated[float, typer.Option(help="seconds to wait for late replies")] = 10.0,
    verify_sessions: Annotated[int, typer.Option(help="per gateway, checked by predict")] = 1,
    allow_remote: Annotated[
        bool, typer.Option(help="allow a target that is not this machine (loopback)")] = False,
    token: Annotated[str | None, typer.Option(envvar="S4SERVE_TOKEN", help="API key")] = None,
    json_out: Annotated[Path | None, typer.Option(help="also write the result as JSON")] = None,
) -> None:
    """Gateways multiplexing many sessions over one connection each; every reply checked."""
    import json

    from loadtest.mux_load import MuxLoadConfig, run_mux_load
    from loadtest.stream_load import run_loop

    cfg = _build(
        MuxLoadConfig, url=url, model=model, gateways=gateways,
        sessions_per_gateway=sessions_per_gateway, rate=rate, frame=frame, hold_s=hold,
        drain_s=drain, verify_sessions=verify_sessions, allow_remote=allow_remote, token=token,
    )  # fmt: skip
    try:
        result = run_loop(run_mux_load(cfg))
    except (RemoteTargetError, RuntimeError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    tp, lat = result.throughput, result.latency_ms
    typer.echo(f"mux {cfg.gateways} gateways × {cfg.sessions_per_gateway} sessions × "
               f"{cfg.rate:g} Hz: {tp['session_samples_per_s']:.0f} session-samples/s "
               f"(offered {tp['offered_session_samples_per_s']:.0f}), p50 {lat['p50']} ms, "
               f"p99 {lat['p99']} ms, lost {result.counts['lost']}, verified "
               f"{result.verify['sessions']} sessions (max err {result.verify['max_abs_err']:.1e})"
               f": {'ok' if result.ok else 'FAILED: ' + '; '.join(result.failures)}")
    if json_out:
        from dataclasses import asdict

        json_out.write_text(json.dumps(asdict(result), indent=1))
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def echo(
    host: str = "127.0.0.1",
    port: int = 8100,
    channels: Annotated[
        int, typer.Option(min=1, help="d_input = d_output of the echo model")
    ] = 1,
    sample_rate: float = 100.0,
    fault: Annotated[
        str | None, typer.Option(help="KIND:N misbehaves every N frames (tests of the tester)")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="processes sharing the port, as `s4serve serve --workers`")
    ] = 1,
) -> None:
    """Serve the model-free echo app (the transport ceiling) on the same FastAPI + uvicorn stack."""
    from loadtest.echo_app import serve_echo

    serve_echo(host, port, channels, sample_rate, fault, workers)
