"""`s4serve bench`: run the model, backend and server benches and write BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from pathlib import Path

from loadtest.bench.machine import machine_info
from loadtest.bench.report import render

SECTIONS = ("model", "backends", "server", "sessions", "soak", "conv", "gpu")


def run_suite(
    quick: bool,
    out: Path,
    sections: tuple[str, ...] = SECTIONS,
    command: str = "",
    log=print,
    json_out: Path | None = None,
) -> dict:
    """Run the chosen sections; a section that fails is reported as such, never skipped silently."""
    from loadtest.bench.backend_bench import run_backend_benches
    from loadtest.bench.conv_bench import run_conv_benches
    from loadtest.bench.gpu_bench import run_gpu_bench
    from loadtest.bench.model_bench import run_model_benches
    from loadtest.bench.server_bench import run_server_benches, run_soak
    from loadtest.bench.sessions_bench import run_sessions_benches

    start = time.monotonic()
    result: dict = {"quick": quick, "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="s4serve-bench-") as tmp:
        scratch = Path(tmp)
        runners = {
            "model": lambda: run_model_benches(quick, log),
            "backends": lambda: run_backend_benches(scratch, quick, log),
            "server": lambda: run_server_benches(scratch, quick, log),
            "sessions": lambda: run_sessions_benches(scratch, quick, log),
            "soak": lambda: run_soak(scratch, quick, log),
            "conv": lambda: run_conv_benches(scratch, quick, log),
            "gpu": lambda: run_gpu_bench(quick, log),
        }
        for name in sections:
            try:
                result[name] = runners[name]()
            except Exception as exc:
                log(traceback.format_exc())
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
    result["machine"]["load_average_end"] = os.getloadavg()
    result["machine"]["duration_s"] = time.monotonic() - start
    out.write_text(render(result, command))
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))
    return result
