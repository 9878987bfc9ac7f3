"""Small-number suppression for figures published about patients.

A count of patients below ``THRESHOLD`` is never published (it could point
at someone: "the only person in this practice who opted out by post
yesterday"); any other count is rounded to the nearest ``ROUNDING``, so
that two published totals cannot be subtracted to recover a small cell
(differencing). Counts of things that are not people (grants, releases)
are published exactly."""

from __future__ import annotations

THRESHOLD = 10
ROUNDING = 5


def suppressed(count: int) -> int | None:
    """The publishable figure for ``count`` patients: ``None`` means "fewer than 10" (and not zero)."""
    if count < 0:
        raise ValueError("a count of patients cannot be negative")
    if count == 0:
        return 0
    if count < THRESHOLD:
        return None
    return ROUNDING * ((count + ROUNDING // 2) // ROUNDING)  # half up: 12 -> 10, 13 -> 15


def shown(count: int | None) -> str:
    """How a suppressed figure reads on a page or in a table."""
    return "fewer than 10" if count is None else f"{count:,}"
