"""``trellis.runtime.shares.split``: whatever the amount and weights, the parts are whole,
never negative, sum to the amount exactly, and each is within one unit of its
proportional share."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trellis.runtime.shares import split

amounts = st.integers(min_value=0, max_value=10**15)
weights = st.lists(st.integers(min_value=-3, max_value=10**6), min_size=1, max_size=60)


@given(amounts, weights)
def test_parts_sum_exactly_and_stay_within_one_of_their_share(total: int, raw: list[int]) -> None:
    parts = split(total, raw)
    assert sum(parts) == total and len(parts) == len(raw)
    sizes = [max(w, 1) for w in raw]
    for part, size in zip(parts, sizes, strict=True):
        exact = Fraction(total * size, sum(sizes))
        assert part >= 0 and abs(part - exact) < 1


@given(amounts, st.integers(min_value=1, max_value=50))
def test_equal_weights_differ_by_at_most_one_earlier_shares_first(total: int, n: int) -> None:
    parts = split(total, [1] * n)
    assert max(parts) - min(parts) <= 1
    assert parts == sorted(parts, reverse=True)


def test_examples_and_refusals() -> None:
    assert split(100, [1, 1, 1]) == [34, 33, 33]
    assert split(10, [1, 3, 6]) == [1, 3, 6]
    assert split(0, [5, 5]) == [0, 0]
    assert split(0, []) == []
    with pytest.raises(ValueError):
        split(-1, [1])
    with pytest.raises(ValueError):
        split(5, [])
