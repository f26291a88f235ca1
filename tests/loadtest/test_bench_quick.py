"""`s4serve bench --quick`: every section runs and the report carries its numbers."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from server.cli import app


def test_quick_bench_writes_a_complete_report(tmp_path: Path):
    out = tmp_path / "BENCH.md"
    raw = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--out", str(out), "--json-out", str(raw)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    data = json.loads(raw.read_text())
    text = out.read_text()
    for heading in ("## Model", "## Backends", "## Server end to end", "16 kHz audio"):
        assert heading in text
    for layer in ("s4d", "s4"):
        entry = data["model"][layer]
        acc = entry["accuracy"]
        assert max(acc["step"], acc["chunk"], acc["conv"]) <= acc["goal"]
        assert entry["step"]["1"]["median_s"] > 0 and entry["step"]["1024"]["median_s"] > 0
        assert [row["d_state"] for row in entry["scaling"]] == [16, 32]
        assert entry["served_step"]["1024"]["median_s"] > 0
        assert entry["roofline_1024"]["bytes"] > 0
    backends = data["backends"]
    assert backends["torch"]["available"]
    assert backends["onnx"]["available"] or backends["onnx"]["reason"]
    for entry in data["server"]["sessions"].values():
        assert entry["model"]["ok"], entry["model"]["failures"]
        assert entry["echo"]["ok"], entry["echo"]["failures"]
        assert entry["model"]["verify_max_abs_err"] <= 1e-4
    assert data["server"]["audio"]["ladder"], "the audio ladder ran at least one step"
    assert data["server"]["chunked"]["ok"], data["server"]["chunked"]["failures"]
    mux = data["server"]["mux"]
    assert mux["ok"], mux["failures"]
    assert mux["verify"]["sessions"] == 2 and mux["cost_vs_step"] > 0
    assert mux["step_paced_per_session_s"] > 0 and mux["cost_vs_step_paced"] > 0
    # the step as timed inside the server is a part of the server's CPU per session-sample
    assert 0 < mux["step_in_server_per_session_s"] < mux["server_cpu_per_session_sample_s"]
    drop = data["server"]["drop"]
    assert drop["idle_s"] is not None and drop["new_sessions_started"] == drop["sessions"]
    assert "### Served step" in text and "Disconnect:" in text and "## Soak" in text
    assert data["soak"]["run"]["ok"], data["soak"]["run"]["failures"]
    assert data["soak"]["rss_growth"] is not None
    sessions = data["sessions"]
    assert sessions["checkpoints"]["ok"] and sessions["checkpoints"]["cpu_s"]["1.0"] > 0
    failover = sessions["failover"]
    assert failover["exact"] and failover["moved"] >= failover["victim_sessions"] > 0
    assert "## Sessions: checkpoint overhead and a lost replica" in text
    conv = data["conv"]
    assert "## Convolution view at batch scale" in text
    for layer in ("s4d", "s4"):
        for run in conv[layer].values():
            assert run["seconds"] > 0 and run["of_ceiling"] > 0 and run["gflops"] > 0
    assert conv["server"]["batched_vs_b1"] > 0
