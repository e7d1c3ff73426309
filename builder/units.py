"""Size units, one convention everywhere (docs/cli.md): decimal SI, kB = 10^3, MB = 10^6, GB = 10^9
bytes, as download sizes and ``--max-size 5MB`` are written. (``--max-size`` also accepts 5MiB.)"""
from __future__ import annotations

from typing import Optional

_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def format_bytes(n: Optional[float]) -> str:
    """``1234567`` -> ``"1.23 MB"``; three significant digits; ``None`` -> ``"-"``."""
    if n is None:
        return "-"
    n = float(n)
    for unit, size in _UNITS:
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{int(n)} B"
