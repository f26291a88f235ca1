"""What /proc says about a server and its workers: CPU seconds and resident memory, summed over
the process and its live descendants."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> Iterator[int]:
    """`pid` and its live descendants (the children of every thread)."""
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # it ended meanwhile
            continue


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (all workers)."""
    total = 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def tree_rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of a process and its live descendants: all of them (VmRSS), or one part
    (RssAnon: private memory, what a leak grows)."""
    total = 0
    for p in _tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += int(re.search(rf"{field}:\s+(\d+)", status).group(1)) * 1024
    return total
