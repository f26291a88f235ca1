"""`s4serve serve --workers N`: N server processes on one port, supervised.

Each worker is a whole server (its own event loop, models, scheduler and slot pools) bound to
the same port with SO_REUSEPORT, so the kernel spreads connections over them and every core
steps sessions. The workers share a run directory:
- `metrics/`: prometheus_client's multiprocess files, so any worker's /metrics reports all;
- `ready/<id>`: a worker's marker while it is ready, so /readyz covers every worker;
- `handoff/<id>.sock`: where a worker asks the others to let go of a live session it was
  asked to resume (server/handoff.py); dropped sessions wait in the shared session store.
The supervisor restarts a worker that dies and forwards SIGTERM/SIGINT (each worker drains).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from server.lifeline import die_with_parent
from server.settings import Settings

log = logging.getLogger("s4serve.workers")
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own switch, read at import


def cpu_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, narrowed by a cgroup CPU quota (a
    container's CPU limit leaves every core of the node in the affinity mask)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of quota from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None: none."""
    try:
        if (root / "cpu.max").is_file():
            quota, _, period = (root / "cpu.max").read_text().partition(" ")
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text()
        if quota.strip() in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def bind_shared(host: str, port: int) -> socket.socket:
    """A listening socket that other processes may bind too (the kernel balances)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(options: dict, worker_id: int, supervisor: int) -> None:
    from server.cli.serve import run_one

    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor, which stops the workers once
    die_with_parent(supervisor)  # SIGTERM (a drain) if the supervisor is killed
    settings = Settings(**options)
    settings.worker_id = worker_id
    run_one(settings, sockets=[bind_shared(settings.host, settings.port)])


def supervise(settings: Settings, workers: int) -> int:
    """Run `workers` server processes until SIGTERM/SIGINT; returns an exit status."""
    if settings.port == 0:
        raise ValueError("--workers > 1 needs a fixed --port (the workers share it)")
    run_dir = Path(tempfile.mkdtemp(prefix="s4serve-run-"))
    for sub in ("metrics", "ready", "handoff"):
        (run_dir / sub).mkdir()
    os.environ[METRICS_ENV] = str(run_dir / "metrics")  # inherited by the workers
    options = settings.model_dump(mode="json")
    options.update(workers=workers, run_dir=str(run_dir))
    context = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.Process] = {}
    stopping = False

    def spawn(worker_id: int) -> None:
        proc = context.Process(target=_worker, args=(options, worker_id, os.getpid()),
                               name=f"s4serve-worker-{worker_id}")
        proc.start()
        procs[worker_id] = proc
        if stopping:  # the signal came while it started: stop() did not see it
            os.kill(proc.pid, signal.SIGTERM)

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    for worker_id in range(workers):
        if stopping:
            break
        spawn(worker_id)
    log.info("serving on %s:%d with %d workers", settings.host, settings.port, workers)
    failed = False
    try:
        while procs:
            time.sleep(0.2)
            for worker_id, proc in list(procs.items()):
                if proc.is_alive():
                    continue
                del procs[worker_id]
                _forget(run_dir, worker_id, proc.pid)
                if stopping:
                    continue
                if proc.exitcode == 1 and not any(p.is_alive() for p in procs.values()):
                    failed = True  # every worker failed to start (models did not load)
                    stop(None, None)
                    continue
                log.warning("worker %d (pid %s) exited with %s; restarting", worker_id,
                            proc.pid, proc.exitcode)
                spawn(worker_id)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failed else 0


def _forget(run_dir: Path, worker_id: int, pid: int | None) -> None:
    """A dead worker is no longer ready, and its live gauges no longer count."""
    (run_dir / "ready" / str(worker_id)).unlink(missing_ok=True)
    (run_dir / "handoff" / f"{worker_id}.sock").unlink(missing_ok=True)
    if pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(run_dir / "metrics"))
