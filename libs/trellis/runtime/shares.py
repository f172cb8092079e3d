"""Splitting an integer amount (nano-USD, tokens) into shares that sum to it exactly.

A batched call serves several nodes, and each node keeps its own usage row: the call's
cost or tokens must be divided so that the rows add up to exactly what the call used,
with no unit lost or created by rounding. ``split`` is the largest-remainder method
(Hamilton's): each share gets the floor of its proportional part, and the units left
over go to the largest remainders, ties to the earlier share, so the split is
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence


def split(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` divided in proportion to ``weights`` (each < 1 counts as 1); the parts
    are whole, never negative, and sum to ``total`` exactly."""
    if total < 0:
        raise ValueError("cannot split a negative amount")
    if not weights:
        if total:
            raise ValueError("cannot split an amount between no shares")
        return []
    sizes = [max(int(w), 1) for w in weights]
    whole = sum(sizes)
    parts = [total * size // whole for size in sizes]
    left = total - sum(parts)
    # Largest remainder first; among equal remainders, the earlier share.
    order = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % whole), i))
    for index in order[:left]:
        parts[index] += 1
    return parts
