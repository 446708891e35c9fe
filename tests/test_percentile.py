"""One percentile for every length summary: an observed value, numpy's method="lower"."""

from __future__ import annotations

import pytest

from tunelab.percentile import percentile


def test_percentile_is_the_lower_observed_value():
    values = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]
    assert percentile(values, 0.9) == 9  # rank floor(0.9 * 9) = 8 of the sorted values
    assert percentile(values, 0.0) == 1 and percentile(values, 1.0) == 10
    assert percentile([42], 0.9) == 42
    assert percentile(list(range(101)), 0.9) == 90


def test_percentile_refuses_what_it_cannot_answer():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.9)
    with pytest.raises(ValueError, match="between 0 and 1"):
        percentile([1, 2], 90)
