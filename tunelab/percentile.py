"""Percentiles of small lists of counts (token lengths): one definition, used by the data audit and the diff."""

from __future__ import annotations

from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0 <= q <= 1) of `values`: the sorted value at rank floor(q * (n - 1)), an observed
    value (numpy's method="lower"), so that a length percentile is a length some example has."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile needs a quantile between 0 and 1, got {q}")
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]
