"""SIGTERM: /readyz turns 503, sessions are snapshotted to the store and closed 1001, and after
a restart they resume where they were (a real `s4serve serve` subprocess)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from loadtest.processes import wait_ready
from server.local_store import LocalDirectoryStore
from tests.server.client import connect, predict, start, stream_binary
from tests.server.conftest import free_port

S4SERVE = str(Path(sys.executable).with_name("s4serve"))


def launch(model_dir: Path, port: int, snapshots: Path, *extra: str,
           **env: str) -> subprocess.Popen:
    """`s4serve serve` with S4SERVE_* variables from `env` (e.g. CHECKPOINT_INTERVAL="1")."""
    env = dict(os.environ, S4SERVE_DRAIN_SECONDS="1.0", S4SERVE_SNAPSHOT_DIR=str(snapshots),
               **{f"S4SERVE_{key}": value for key, value in env.items()})
    process = subprocess.Popen(
        [S4SERVE, "serve", "--model", str(model_dir), "--port", str(port), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=process)
    except (RuntimeError, TimeoutError):
        process.kill()
        raise RuntimeError(process.communicate()[0]) from None
    return process


async def test_sigterm_drains_snapshots_and_resumes_after_restart(model_dirs, tmp_path):
    port, snapshots = free_port(), tmp_path / "sessions"
    url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    u = np.random.default_rng(41).standard_normal((50, 2)).astype(np.float32)
    process = launch(model_dirs["seq"], port, snapshots)
    try:
        expected = np.array(predict(url, "seq", u[None])["outputs"])[0]
        ws = await connect(ws_url, "seq")
        token = (await start(ws))["resume_token"]
        before = await stream_binary(ws, [u[:20]], 3)
        idle = await connect(ws_url, "seq")  # admitted, no session (yet): closed too
        await asyncio.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        async with await connect(ws_url, "seq") as refused:
            with pytest.raises(websockets.ConnectionClosed):
                await refused.recv()
            assert refused.close_code == 1013
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (1001, "server_shutdown")
        with pytest.raises(websockets.ConnectionClosed):
            await idle.recv()
        assert idle.close_code == 1001
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        assert time.monotonic() - signalled < 8  # no wait for connections left open
    finally:
        process.kill()
    assert len({digest for digest, _ in LocalDirectoryStore(snapshots).records()}) == 1

    process = launch(model_dirs["seq"], port, snapshots)
    try:
        async with await connect(ws_url, "seq") as ws:
            resumed = await start(ws, resume=token)
            assert resumed["samples"] == 20
            after = await stream_binary(ws, [u[20:]], 3)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    np.testing.assert_allclose(np.concatenate([before, after]), expected, atol=1e-4)
