"""`s4serve stream MODEL FILE` against a real server: WAV (its rate passed as sample_rate),
CSV, .npy and stdin; the printed numbers are the stream's; --plot writes a PNG."""

from __future__ import annotations

import wave

import numpy as np
from typer.testing import CliRunner

from server.cli import app
from tests.server.client import predict


def write_wav(path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def test_wav_at_its_own_rate_prints_labels_and_plots(server, tmp_path):
    pcm = (np.sin(np.arange(4000) * 0.05) * 8000).astype(np.int16)
    write_wav(tmp_path / "a.wav", pcm, 8000)  # the model was trained at 16 kHz
    result = CliRunner().invoke(app, ["stream", "cls", str(tmp_path / "a.wav"), "--url",
                                      server.url, "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip().endswith(
        tuple("0123456789"))]
    assert len(lines) == 25  # 4000 samples in 20 ms frames of 160
    logits = np.array(predict(server.url, "cls", (pcm / 32768.0)[None, :, None],
                              sample_rate=8000, outputs="last")["outputs"])[0, -1]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    label = ["low", "mid", "high"][int(p.argmax())]
    assert lines[-1].split()[1:] == [label, f"{p.max():.3f}"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_npy_and_stdin_give_the_stream_outputs(server, tmp_path):
    u = np.random.default_rng(4).standard_normal((12, 2)).astype(np.float32)
    expected = np.array(predict(server.url, "seq", u[None])["outputs"])[0]
    csv = "a,b\n" + "\n".join(f"{x},{y}" for x, y in u) + "\n"
    (tmp_path / "u.csv").write_text(csv)
    np.save(tmp_path / "u.npy", u)
    runs = [["stream", "seq", str(tmp_path / "u.csv")],
            ["stream", "seq", str(tmp_path / "u.npy"), "--frame", "4"],
            ["stream", "seq", "-"]]
    for argv in runs:
        result = CliRunner().invoke(app, [*argv, "--url", server.url],
                                    input=csv if argv[2] == "-" else None)
        assert result.exit_code == 0, result.output
        rows = np.array([[float(v) for v in line.split()[1:]]
                         for line in result.output.splitlines()])
        step = 4 if "--frame" in argv else 1
        np.testing.assert_allclose(rows, expected[step - 1::step], atol=1e-3)


def test_unknown_model_is_a_clear_error(server, tmp_path):
    np.save(tmp_path / "u.npy", np.zeros((3, 2), np.float32))
    result = CliRunner().invoke(app, ["stream", "nope", str(tmp_path / "u.npy"), "--url",
                                      server.url])
    assert result.exit_code == 2 and "model_not_found" in result.output
