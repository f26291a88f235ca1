"""A cluster on loopback, from real parts: a redis-server, N `s4serve serve` replicas sharing it
as their session store, and nginx with the shipped deploy/nginx/nginx.conf in front. Used by
tests/deploy/test_nginx_failover.py and the failover benchmark (loadtest/failover.py)."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from loadtest.processes import ServerProcess, free_port

NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "nginx.conf"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} is not installed (tests/system-deps.sh installs it)")
    return found


def _wait_port(port: int, process: subprocess.Popen, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A throwaway redis-server (no persistence); yields its URL."""
    port = free_port()
    process = subprocess.Popen([_tool("redis-server"), "--port", str(port), "--bind",
                                "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def nginx_conf(replica_ports: list[int], port: int, template: str | None = None) -> str:
    """The shipped config with these replicas (the `# replica` lines) and port."""
    text = template if template is not None else NGINX_CONF.read_text()
    ports = iter(replica_ports)
    marked = re.findall(r"server s4serve-\d+:8000.*# replica", text)
    if len(marked) != len(replica_ports):
        raise ValueError(f"the config names {len(marked)} replicas, not {len(replica_ports)}")
    text = re.sub(r"server s4serve-\d+:8000", lambda _: f"server 127.0.0.1:{next(ports)}", text)
    return text.replace("listen 8080;", f"listen 127.0.0.1:{port};")


@contextlib.contextmanager
def nginx(prefix: Path, replica_ports: list[int]) -> Iterator[str]:
    """nginx running the shipped config in front of `replica_ports`; yields its URL."""
    port = free_port()
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(nginx_conf(replica_ports, port))
    exe = _tool("nginx")
    check = subprocess.run([exe, "-t", "-p", str(prefix), "-c", "nginx.conf"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t: {check.stderr}")
    process = subprocess.Popen([exe, "-p", str(prefix), "-c", "nginx.conf", "-g",
                                "daemon off;"], stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, process, "nginx")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


class Cluster:
    """`with Cluster(model_dir, replicas=3) as c`: c.url (nginx), c.replicas (ServerProcess),
    c.redis_url. Extra S4SERVE_* settings go in `env` (e.g. CHECKPOINT_INTERVAL)."""

    def __init__(self, model_dir: Path, replicas: int = 3, workers: int = 1,
                 env: dict[str, str] | None = None, scratch: Path | None = None) -> None:
        self.model_dir, self.count, self.workers = model_dir, replicas, workers
        self.env = {f"S4SERVE_{k}": v for k, v in (env or {}).items()}
        self._scratch = scratch
        self._stack = contextlib.ExitStack()
        self.replicas: list[ServerProcess] = []
        self.url = self.redis_url = ""

    def __enter__(self) -> Cluster:
        stack = self._stack
        try:
            root = self._scratch or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            root.mkdir(parents=True, exist_ok=True)
            self.redis_url = stack.enter_context(redis_server(root))
            self.replicas = [ServerProcess.s4serve(
                [self.model_dir], extra=["--workers", str(self.workers)],
                log_path=root / f"replica{i}.log",
                env={"S4SERVE_STORE": self.redis_url, "S4SERVE_DRAIN_SECONDS": "1.0",
                     "S4SERVE_SNAPSHOT_DIR": str(root / f"replica{i}"), **self.env})
                for i in range(self.count)]
            for replica in self.replicas:
                stack.callback(replica.stop)
            with ThreadPoolExecutor(self.count) as pool:  # their model loads overlap
                list(pool.map(lambda r: r.__enter__(), self.replicas))
            self.url = stack.enter_context(nginx(root / "nginx", [r.port for r in
                                                                  self.replicas]))
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
        self._stack.close()


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of a replica's /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    pattern = rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)" if labels else \
        rf"^{re.escape(name)} (\S+)"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0
