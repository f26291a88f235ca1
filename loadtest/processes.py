"""Servers under test as child processes: the real `s4serve serve` or the echo app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

READY_TIMEOUT_S = 120.0
# a server the load tools did not start: refusing connections this long means nothing is there
UNREACHABLE_S = 3.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, timeout_s: float = READY_TIMEOUT_S, proc=None,
               unreachable_s: float | None = None) -> None:
    """Poll /readyz until 200; fail early if the process died, or (`unreachable_s`: a server
    someone else runs) if nothing has accepted a connection for that long."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.ConnectError as exc:
            if unreachable_s is not None and time.monotonic() - started >= unreachable_s:
                raise RuntimeError(f"cannot connect to {base_url}: {exc}") from None
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s")


class ServerProcess:
    """`with ServerProcess.s4serve([dir]) as srv: srv.url` — started, ready, then stopped."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.argv, self.port = argv, port
        self.ready_timeout_s = ready_timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @classmethod
    def s4serve(
        cls, model_dirs: list[Path], port: int | None = None, extra: list[str] = (), **kw
    ) -> ServerProcess:
        port = port or free_port()
        argv = [
            sys.executable,
            "-c",
            "from server.cli import app; app()",
            "serve",
            "--port",
            str(port),
        ]
        for d in model_dirs:
            argv += ["--model", str(d)]
        return cls([*argv, *extra], port, **kw)

    @classmethod
    def echo(
        cls, port: int | None = None, channels: int = 1, fault: str | None = None,
        workers: int = 1, **kw,
    ) -> ServerProcess:
        port = port or free_port()
        argv = [sys.executable, "-m", "loadtest", "echo", "--port", str(port),
                "--workers", str(workers)]
        argv += ["--channels", str(channels)] + (["--fault", fault] if fault else [])
        return cls(argv, port, **kw)

    def __enter__(self) -> ServerProcess:
        if self.log_path:
            with open(self.log_path, "w") as log:  # the child keeps its own copy of the fd
                self.proc = subprocess.Popen(
                    self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
                )
        else:
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=self.env
            )
        try:
            wait_ready(self.url, self.ready_timeout_s, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
