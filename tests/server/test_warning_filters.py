"""Warning filters are process-wide and `warnings.catch_warnings()` swaps them whole: two
threads using it at once can interleave and leave the wrong filters behind (every warning
silenced, or ones a library hid shown). The server loads models on a worker thread while its
event loop answers requests (a HEALTHCHECK during start-up), so neither side may use it."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

from fastapi.testclient import TestClient

from model.checkpoint import load_model
from model.onnx_export import export_onnx
from server.app import create_app
from tests.server.conftest import make_settings


def _refuse(*_args, **_kwargs):
    raise AssertionError("warnings.catch_warnings() swaps the process's warning filters")


def test_routes_are_built_before_the_first_request(model_dirs, tmp_path, monkeypatch):
    app = create_app(make_settings(model_dirs, tmp_path))
    client = TestClient(app)  # no lifespan: as if the models were still loading
    with monkeypatch.context() as patch:  # only around our calls: pytest itself uses it
        patch.setattr(warnings, "catch_warnings", _refuse)
        models = client.get("/v1/models/nosuch").status_code
        health = client.get("/healthz").status_code
    assert models in (404, 503) and health == 200


def test_loading_and_compiling_a_model_leaves_the_filters_alone(model_dirs, tmp_path,
                                                                 monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(warnings, "catch_warnings", _refuse)
        net = load_model(model_dirs["seq"])
        net.to_recurrent().compiled_step("torchscript")
        export_onnx(net, tmp_path)


def test_the_tracer_and_exporter_notices_are_filtered_where_they_arise(model_dirs, tmp_path):
    # In a process of its own: pytest sets its own filters (pyproject.toml) over the modules'.
    code = """if True:
        import sys, warnings
        import torch
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("error", UserWarning)
        from model.checkpoint import load_model
        from model.onnx_export import export_onnx
        net = load_model(sys.argv[1])
        net.to_recurrent().compiled_step("torchscript")
        export_onnx(net, sys.argv[2])
    """
    done = subprocess.run([sys.executable, "-c", code, str(model_dirs["seq"]), str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
