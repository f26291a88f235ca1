"""Where a server process spends its CPU during a load: py-spy samples, summarised."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
_PATH = re.compile(r"\((?:[^()]*/)?([^/()]+/[^/()]+)\)$")  # keep "package/module.py"
_OWN = re.compile(r"\((server|model)/")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start_profile(pid: int, duration_s: float, out: Path) -> subprocess.Popen | None:
    """Sample `pid` and its children (the workers) for `duration_s` (non-blocking, so the
    server is not paused)."""
    binary = py_spy()
    if binary is None:
        return None
    argv = [binary, "record", "-p", str(pid), "-d", str(max(1, round(duration_s))), "-r", "100",
            "-f", "raw", "-o", str(out), "--nonblocking", "--subprocesses"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_profile(proc: subprocess.Popen | None, out: Path, top: int = 8) -> dict:
    if proc is None:
        return {"available": False, "reason": "py-spy not installed"}
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0 or not out.exists():
        return {"available": False, "reason": (err or "py-spy failed").strip()[-300:]}
    return {"available": True, **summarize_collapsed(out.read_text(), top)}


def summarize_collapsed(text: str, top: int = 8) -> dict:
    """Self time by leaf frame, and inclusive time of the project's own functions."""
    own, inclusive = Counter(), Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_PATH.sub(r"(\1)", _LINE.sub(")", f)) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            if _OWN.search(frame):
                inclusive[frame] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    return {
        "samples": total,
        "self": [(f, n / total) for f, n in own.most_common(top)],
        "inclusive": [(f, n / total) for f, n in inclusive.most_common(top)],
    }
