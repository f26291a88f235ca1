"""A second opinion from k6: the same stream load through loadtest/k6/stream.js."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "k6" / "stream.js"


def k6_binary() -> str | None:
    local = Path(sys.executable).parent / "k6"
    return str(local) if local.exists() else shutil.which("k6")


def run_k6(
    url: str, model: str, sessions: int, rate: float, duration_s: float, scratch: Path
) -> dict:
    """Run the k6 script and pick its frame counts and latency percentiles from the summary."""
    binary = k6_binary()
    if binary is None:
        return {"available": False, "reason": "k6 not installed"}
    summary = scratch / f"k6-{model}-{sessions}.json"
    argv = [binary, "run", "--no-usage-report", "-q", "--summary-export", str(summary),
            "--summary-trend-stats", "med,p(90),p(99),max", str(SCRIPT),
            "-e", f"URL={url}", "-e", f"MODEL={model}", "-e", f"SESSIONS={sessions}",
            "-e", f"RATE={rate}", "-e", "FRAME=1", "-e", f"DURATION={duration_s}",
            "-e", "DRAIN=15"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 120)
    if not summary.exists():
        return {"available": False, "reason": (proc.stderr or proc.stdout)[-300:]}
    data = json.loads(summary.read_text())
    metrics = data["metrics"]
    checks = data.get("root_group", {}).get("checks", {})
    failed_checks = {name: c.get("fails", 0) for name, c in checks.items() if c.get("fails")}
    latency = metrics.get("s4_frame_latency", {})
    sent = metrics.get("s4_frames_sent", {}).get("count", 0)
    answered = metrics.get("s4_frames_answered", {}).get("count", 0)
    return {
        "available": True,
        "passed": proc.returncode == 0,
        "failed_checks": failed_checks,
        "bad_replies": metrics.get("s4_bad_replies", {}).get("count", 0),
        "sessions": sessions,
        "frames_sent": sent,
        "frames_answered": answered,
        "answered_per_s": answered / duration_s,
        "latency_ms": {k: latency.get(k) for k in ("med", "p(90)", "p(99)", "max")},
    }
