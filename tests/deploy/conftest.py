"""Shared helpers for the deployment tests: repository paths and required external tools."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of an external tool the deployment tests need. Missing tools fail the test (they are
    installed by .ci/run); they are never a reason to skip."""
    found = shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed (Debian package or .venv; see docs/deploy.md)")
    return found
