"""Table cells for BENCHMARKS.md: times as median (IQR), numbers, rows, yes/NO."""

from __future__ import annotations


def dur(entry: dict | None) -> str:
    """'median unit (IQR x)', in the unit that puts the median between 1 and 1000."""
    if not entry:
        return "-"
    med = entry["median_s"]
    unit, scale = next(((u, k) for u, k in (("s", 1.0), ("ms", 1e3)) if med * k >= 1), ("µs", 1e6))
    return f"{med * scale:.3g} {unit} (IQR {entry['iqr_s'] * scale:.2g})"


def num(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def trow(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"
