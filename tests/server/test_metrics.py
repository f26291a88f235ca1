"""/metrics: the documented names, no per-session labels, and `promtool check metrics` clean."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import numpy as np

from tests.server.client import connect, predict, start, stream_binary

NAMES = [
    "s4serve_sessions_active", "s4serve_sessions_opened_total", "s4serve_session_limit",
    "s4serve_samples_total", "s4serve_frames_total", "s4serve_requests_total",
    "s4serve_frame_latency_seconds", "s4serve_predict_latency_seconds",
    "s4serve_step_batch_size", "s4serve_step_seconds", "s4serve_conv_seconds",
    "s4serve_queue_depth", "s4serve_errors_total", "s4serve_model_info",
]


async def test_metrics_after_traffic_pass_promtool(server):
    predict(server.url, "seq", np.zeros((1, 8, 2)))
    async with await connect(server.ws_url, "seq") as ws:
        await start(ws)
        await stream_binary(ws, [np.zeros((1, 2)), np.zeros((3, 2))], 3)
        await ws.send(b"bad")
        await ws.recv()
    text = httpx.get(server.url + "/metrics").text
    for name in NAMES:
        assert f"# TYPE {name} " in text, name
    info = 's4serve_model_info{backend="torch",device="cpu",layer="s4",model="cls",version="1"}'
    assert f"{info} 1.0" in text
    assert 's4serve_errors_total{code="bad_shape"}' in text
    labels = {part.split("=")[0] for line in text.splitlines() if "{" in line
              for part in line[line.index("{") + 1 : line.index("}")].split(",")}
    assert labels <= {"model", "mode", "outcome", "kind", "code", "le", "version", "layer",
                      "device", "backend", "path"}
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed for this check"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                             capture_output=True, timeout=60)
    assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == "", checked
