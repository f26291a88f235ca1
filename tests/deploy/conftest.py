"""Shared helpers for the deployment tests: repository paths and required external tools."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

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


def load_deploy_script(name: str) -> ModuleType:
    """Imports a helper script of deploy/docker (not a package: it is run as a file)."""
    path = DEPLOY / "docker" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"deploy_docker_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module
