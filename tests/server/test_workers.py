"""`s4serve serve --workers 2`: one port, two processes; sessions taken over across workers,
metrics and readiness of all workers together, a killed worker restarted, SIGTERM drains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from server.local_store import LocalDirectoryStore
from tests.server.client import connect, predict, start, stream_binary
from tests.server.conftest import free_port

S4SERVE = str(Path(sys.executable).with_name("s4serve"))


def wait_ready(url: str, process: subprocess.Popen, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("workers did not become ready")


@pytest.fixture
def cluster(model_dirs, tmp_path):
    port = free_port()
    env = dict(os.environ, S4SERVE_STEP_COMPILER="torchscript",
               S4SERVE_SNAPSHOT_DIR=str(tmp_path / "sessions"))
    process = subprocess.Popen(
        [S4SERVE, "serve", "--workers", "2", "--port", str(port), "--model",
         str(model_dirs["seq"]), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield process, url, f"ws://127.0.0.1:{port}", tmp_path / "sessions"
    finally:
        process.kill()  # the workers follow it (server/lifeline.py)
        process.wait(10)


def worker_pids(supervisor: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True)
    kept = []
    for pid in (int(p) for p in out.stdout.split()):
        try:  # a worker just killed may be reaped between pgrep and this read: it is gone
            cmdline = Path(f"/proc/{pid}/cmdline").read_text()
        except FileNotFoundError:
            continue
        if "resource_tracker" not in cmdline:
            kept.append(pid)
    return kept


def metric(url: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_sessions_move_between_workers_with_the_same_numbers(cluster):
    _, url, ws_url, _ = cluster
    u = np.random.default_rng(1).standard_normal((30, 2)).astype(np.float32)
    expected = np.array(predict(url, "seq", u[None])["outputs"])[0]
    for _ in range(12):  # the kernel picks a worker per connection: some resumes cross over
        first = await connect(ws_url, "seq")
        token = (await start(first))["resume_token"]
        head = await stream_binary(first, [u[:10]], 3)
        async with await connect(ws_url, "seq") as second:
            resumed = await start(second, resume=token)
            assert resumed["samples"] == 10
            with pytest.raises(websockets.ConnectionClosed):
                await first.recv()
            assert (first.close_code, first.close_reason) == (1008, "resumed_elsewhere")
            tail = await stream_binary(second, [u[10:]], 3)
        np.testing.assert_allclose(np.concatenate([head, tail]), expected, atol=1e-4)
    assert metric(url, "s4serve_handoffs_total") >= 1  # at least one crossed workers
    assert metric(url, "s4serve_sessions_opened_total") == 24  # both workers counted


async def test_a_killed_worker_is_replaced_and_sigterm_drains_all(cluster):
    process, url, ws_url, snapshots = cluster
    before = worker_pids(process.pid)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while sorted(worker_pids(process.pid)) == sorted(before) or len(worker_pids(process.pid)) < 2:
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.1)
    wait_ready(url, process)
    sessions = []
    for _ in range(6):
        ws = await connect(ws_url, "seq")
        await start(ws)
        await stream_binary(ws, [np.zeros((5, 2), np.float32)], 3)
        sessions.append(ws)
    process.send_signal(signal.SIGTERM)
    for ws in sessions:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (1001, "server_shutdown")
    assert process.wait(timeout=30) == 0
    # every session resumable (a record is two halves of a slab file, written in turn)
    assert len({digest for digest, _ in LocalDirectoryStore(snapshots).records()}) == 6


def descendants(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = {int(p) for p in out.stdout.split()}
    return children.union(*(descendants(c) for c in children))


def test_workers_end_when_the_supervisor_is_killed(cluster):
    process, url, _, _ = cluster
    left = descendants(process.pid)  # workers, their predict workers, the resource tracker
    assert len(left) >= 4
    process.kill()
    process.wait(10)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in left):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        time.sleep(0.2)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)



def test_default_worker_count_follows_a_container_cpu_limit(tmp_path):
    from server.workers import cpu_cores

    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")  # no limit: every core it may run on
    assert cpu_cores(v2) == affinity
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a core: still one worker
    assert cpu_cores(v2) == 1
    (v2 / "cpu.max").write_text(f"{150000 * affinity} 100000\n")  # more than the mask allows
    assert cpu_cores(v2) == affinity
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_cores(v1.parent) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_cores(v1.parent) == affinity
    assert cpu_cores(tmp_path / "absent") == affinity
