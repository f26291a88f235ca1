"""`s4serve stream MODEL FILE`: stream a recording to a running server, print what it says.

FILE is a WAV (any rate: passed as the session's `sample_rate`, never resampled; int16 PCM),
a CSV (one sample per row, d_input numbers), a .npy (length × d_input), or `-` for CSV rows on
stdin, sent as they arrive. Classifiers print the label and probability of each frame's last
sample; other models print the outputs. `--plot` draws the outputs (or class probabilities).
"""

from __future__ import annotations

import sys
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import typer


def register(app: typer.Typer) -> None:
    app.command("stream")(stream)


def read_wav(path: Path) -> tuple[np.ndarray, float]:
    """(length, channels) int16 samples and the file's rate."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getcomptype() != "NONE":
                raise typer.BadParameter(f"{path}: only 16-bit PCM WAV files are supported")
            data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            return data.reshape(-1, w.getnchannels()), float(w.getframerate())
    except (wave.Error, EOFError, ValueError) as exc:  # EOFError: a truncated header
        reason = str(exc) or "truncated"
        raise typer.BadParameter(f"{path}: not a readable 16-bit PCM WAV file ({reason})") from None


def _rows(text: Iterator[str]) -> Iterator[list[float]]:
    for number, line in enumerate(text):
        cells = [c for c in line.replace(";", ",").split(",") if c.strip()]
        if not cells:
            continue
        try:
            yield [float(c) for c in cells]
        except ValueError:
            if number == 0:
                continue  # a header line
            raise typer.BadParameter(
                f"line {number + 1} is not numbers: {line.strip()!r}") from None


def read_samples(file: str) -> tuple[np.ndarray | Iterator[list[float]], float | None]:
    """The whole recording (WAV, CSV, .npy) or, for `-`, an iterator of rows from stdin."""
    if file == "-":
        return _rows(sys.stdin), None
    path = Path(file)
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {file}")
    suffix = path.suffix.lower()
    if suffix == ".wav":
        samples, rate = read_wav(path)
    elif suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError:  # numpy's message speaks of pickles for any unreadable file
            raise typer.BadParameter(f"{path}: not a readable .npy file of numbers") from None
        if array.ndim not in (1, 2) or array.dtype.kind not in "iuf":
            raise typer.BadParameter(f"{path}: expected numbers of shape (length,) or "
                                     f"(length, d_input), got {array.dtype} {array.shape}")
        samples, rate = (array[:, None] if array.ndim == 1 else array).astype(np.float32), None
    else:
        try:
            with path.open(encoding="utf-8") as text:
                rows = list(_rows(text))
            samples, rate = np.asarray(rows, dtype=np.float32), None
        except (UnicodeDecodeError, ValueError) as exc:
            raise typer.BadParameter(f"{path}: not a CSV of equal rows of numbers "
                                     f"({str(exc).splitlines()[0]})") from None
    if len(samples) == 0:
        raise typer.BadParameter(f"{path}: no samples in it")
    return samples, rate


def _frames(samples, frame: int) -> Iterator[np.ndarray]:
    if isinstance(samples, np.ndarray):
        for start in range(0, len(samples), frame):
            yield samples[start:start + frame]
        return
    block: list[list[float]] = []
    for row in samples:
        block.append(row)
        if len(block) == frame:
            yield np.asarray(block, np.float32)
            block = []
    if block:
        yield np.asarray(block, np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def stream(
    model: Annotated[str, typer.Argument(help="Model name on the server.")],
    file: Annotated[str, typer.Argument(help="WAV, CSV or .npy file, or - for CSV on stdin.")],
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
    token: Annotated[str | None, typer.Option(help="API key.", envvar="S4SERVE_TOKEN")] = None,
    frame_ms: Annotated[
        float, typer.Option(min=0.001, help="Frame length for WAV files, ms.")
    ] = 20.0,
    frame: Annotated[
        int | None, typer.Option(min=1, help="Samples per frame (default: WAV frame_ms, "
                                 "else 1).")
    ] = None,
    sample_rate: Annotated[
        float | None, typer.Option(help="Sample rate of CSV/.npy/stdin data (Hz).")
    ] = None,
    every: Annotated[int, typer.Option(min=1, help="Print every Nth frame.")] = 1,
    plot: Annotated[Path | None, typer.Option(help="Also draw the outputs into this PNG.")] = None,
) -> None:
    """Stream a recording to a running server and print the predictions as they arrive."""
    import httpx

    from client import Client, ClientError, StreamError
    from client.connection import base_url

    if plot is not None:
        _need_matplotlib()  # before streaming the file, not after
    url = base_url(url)
    samples, file_rate = read_samples(file)
    rate = file_rate or sample_rate
    wav = file_rate is not None
    size = frame or (max(1, round(rate * frame_ms / 1000)) if wav else 1)
    outputs: list[np.ndarray] = []
    try:
        with Client(url, token) as client:
            info = client.model(model)
            labels = info.get("labels")
            with client.stream(model, dtype="int16" if wav else "float32",
                               sample_rate=rate) as session:
                done = 0
                for index, chunk in enumerate(_frames(samples, size)):
                    y = session.send(chunk)
                    outputs.append(y)
                    done += len(chunk)
                    if index % every:
                        continue
                    at = f"{done / rate:8.3f}s" if rate else f"{done:8d}"
                    if labels:
                        p = _softmax(y[-1])
                        typer.echo(f"{at}  {labels[int(p.argmax())]:<12} {p.max():.3f}")
                    else:
                        typer.echo(f"{at}  " + " ".join(f"{v:.4f}" for v in y[-1]))
    except (ClientError, StreamError, OSError, httpx.HTTPError) as exc:
        typer.echo(f"error: {url}: {exc}", err=True)
        raise typer.Exit(2) from None
    if plot is not None and outputs:
        _plot(np.concatenate(outputs), labels, rate, plot)
        typer.echo(f"wrote {plot}")


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise typer.BadParameter("--plot needs matplotlib: pip install 's4serve[loadtest]'",
                                 param_hint="--plot") from None


def _plot(y: np.ndarray, labels: list[str] | None, rate: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = _softmax(y) if labels else y
    x = np.arange(len(values)) / rate if rate else np.arange(len(values))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for k in range(values.shape[1]):
        ax.plot(x, values[:, k], label=labels[k] if labels else f"output {k}")
    ax.set_xlabel("seconds" if rate else "sample")
    ax.set_ylabel("probability" if labels else "output")
    ax.legend(loc="upper left", fontsize="small", ncol=min(5, values.shape[1]))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
