"""The image end to end: deploy/docker/smoke.sh builds it from a debootstrap base and a local
wheelhouse, runs it, and streams one session and one predict through it (a few minutes the first
time on a machine, when the base image is built; about 2-5 minutes afterwards)."""

from __future__ import annotations

import subprocess
import warnings

import pytest

from tests.deploy.conftest import DEPLOY, REPO, tool

NO_ENGINE = 77  # smoke.sh: this machine cannot run a Docker engine at all


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_image_builds_runs_and_serves():
    result = subprocess.run(["bash", str(DEPLOY / "docker" / "smoke.sh")], cwd=REPO,
                            capture_output=True, text=True, timeout=1400)
    if result.returncode == NO_ENGINE:
        reason = ("!!! DOCKER IMAGE NOT TESTED: this machine cannot run a Docker engine: "
                  + result.stderr.strip().splitlines()[-1])
        warnings.warn(reason, stacklevel=1)
        print(reason)
        pytest.skip(reason)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "smoke: ok " in result.stdout
    assert "HEALTHCHECK reports healthy" in result.stderr or "host networking" in result.stderr


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_unprivileged_and_checks_health():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0].startswith("ARG BASE=")
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and all(not u.startswith("0") and u != "root" for u in users)
    (healthcheck,) = [i for i, line in enumerate(lines) if line.startswith("HEALTHCHECK")]
    assert "/healthz" in lines[healthcheck + 1]
    assert sum(line.startswith("FROM ") for line in instructions) >= 2  # multi-stage
    assert any("runtime-cuda" in line for line in instructions)
