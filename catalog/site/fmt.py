"""Number formatting for the site (pure functions; every measured number passes through here)."""

from __future__ import annotations

import math
from typing import Any

MISSING = "-"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def macs(value: Any) -> str:
    """MACs per sample with an SI prefix: ``4089000000 -> '4.089 G'``."""
    v = _number(value)
    if v is None or math.isnan(v):
        return MISSING
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3f} {unit}"
    return f"{v:.0f}"


def ms(value: Any) -> str:
    """A latency in milliseconds, three decimals."""
    v = _number(value)
    return MISSING if v is None or math.isnan(v) else f"{v:.3f}"


def ratio(value: Any) -> str:
    """A ratio such as a speedup or a MAC reduction: ``1.5 -> '1.50x'``."""
    v = _number(value)
    if v is None or math.isnan(v):
        return MISSING
    return "inf" if math.isinf(v) else f"{v:.2f}x"


def plain(value: Any, digits: int = 2) -> str:
    """A dimensionless number such as the realization ratio."""
    v = _number(value)
    if v is None or math.isnan(v):
        return MISSING
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def count(value: Any) -> str:
    """An integer count with thousands separators."""
    v = _number(value)
    return MISSING if v is None else f"{int(v):,}"
