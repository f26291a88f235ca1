"""The command line, the predict load and the k6 script, end to end against the echo app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loadtest.config import PredictLoadConfig
from loadtest.predict_load import run_predict_load
from loadtest.processes import ServerProcess
from loadtest.stream_load import run_loop

ROOT = Path(__file__).resolve().parents[2]
K6 = Path(sys.executable).parent / "k6"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_writes_json_and_png_and_exits_zero(echo_url: str, tmp_path: Path):
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    proc = _cli(
        "stream", "--url", echo_url, "--model", "echo", "-n", "3", "--rate", "100",
        "--ramp", "0.1", "--hold", "0.5", "--json-out", str(out_json), "--png-out", str(out_png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out_json.read_text())
    assert data["ok"] and data["counts"]["replies_ok"] == data["counts"]["frames_sent"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in proc.stdout


def test_cli_fails_on_faults_and_refuses_remote_targets():
    with ServerProcess.echo(fault="drop:10") as srv:
        proc = _cli("stream", "--url", srv.url, "--model", "echo", "-n", "2", "--hold", "0.5",
                    "--drain", "1")  # fmt: skip
    assert proc.returncode == 1 and "lost" in proc.stdout
    remote = _cli("stream", "--url", "http://10.11.12.13:9", "--model", "echo")
    assert remote.returncode == 2 and "allow-remote" in remote.stderr


def test_predict_load_checks_shapes(echo_url: str):
    cfg = PredictLoadConfig(url=echo_url, model="echo", batch=3, length=200, concurrency=2,
                            duration_s=0.5)  # fmt: skip
    result = run_loop(run_predict_load(cfg))
    assert result.ok, result.failures
    assert result.requests_ok > 0 and result.wrong_shape == 0
    assert result.throughput["samples_per_s"] > 0


def _k6(url: str, sessions: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(K6), "run", "--no-usage-report", "-q", str(ROOT / "loadtest/k6/stream.js"),
         "-e", f"URL={url}", "-e", "MODEL=echo", "-e", f"SESSIONS={sessions}",
         "-e", "RATE=100", "-e", "DURATION=1", "-e", "DRAIN=5"],  # late end replies on a busy box
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_k6_script_passes_on_echo_and_fails_on_lost_replies(echo_url: str):
    good = _k6(echo_url, 3)
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    assert "s4_frames_answered" in good.stdout
    with ServerProcess.echo(fault="drop:10") as srv:
        bad = _k6(srv.url, 2)
    assert bad.returncode != 0
