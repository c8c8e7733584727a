"""Summary statistics shared by the benchmarks."""

from __future__ import annotations


def percentile(values: list[float], pct: float) -> float:
    """The `pct` percentile (0-100) of `values` by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]
