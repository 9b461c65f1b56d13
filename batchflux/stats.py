"""Timestamps and small statistics: the neutral helpers runs and post-run tools share.

Nothing here knows about runs, items or the API; it imports nothing of batchflux's own.

>>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
2.5
>>> parse_time("2026-03-15T10:00:32.000Z")
1773568832.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime

__all__ = ["parse_time", "percentile", "rounded", "utc_now"]


def utc_now() -> str:
    """Now, as the API and result lines write times: ISO 8601, milliseconds, ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> float | None:
    """Unix seconds of an ISO 8601 time (``Z`` or an offset), or None for none or garbage."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` quantile (0 to 1) of ``values`` by linear interpolation between closest
    ranks (what ``statistics.quantiles(method="inclusive")`` does), or None when empty."""
    data = sorted(values)
    if not data:
        return None
    position = (len(data) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return data[low] + (data[high] - data[low]) * (position - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded for a summary (None stays None)."""
    return None if value is None else round(value, digits)
