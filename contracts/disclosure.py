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


# Entries anyone may read with their proofs (GET /v1/public-entries): grants,
# revocations, approvals, outputs, value received and allocated, and data
# uses. A data use names its cohort by the SHA-256 of the member list, which
# for a cohort of one or two could be found by trying every NHS number, so a
# use of fewer than THRESHOLD patients stays unpublished.
PUBLIC_EVENT_TYPES = ("AccessGranted", "AccessRevoked", "GrantApproved", "OutputRecorded", "ValueReceived",
                      "ValueAllocated", "DataUseRecorded")


def publishable(event_type: str, cohort_size: int | None) -> bool:
    """Whether an entry of ``event_type`` (a data use: of ``cohort_size`` patients) may be published."""
    if event_type not in PUBLIC_EVENT_TYPES:
        return False
    return event_type != "DataUseRecorded" or (cohort_size or 0) >= THRESHOLD
