"""Reads are written to the ledger before the data leaves.

A patient's choices, history and receipts, the ledger entries an auditor
pages through and the cohorts it re-checks are personal data; an opt-out
filter call reveals who of a list opted out.  Each such read appends a
``PersonalDataRead`` event through the normal store path (so it is
hash-chained like every other event) and only then is the answer sent: if
the read cannot be recorded, it is not served.

Each read is its own aggregate (a fresh id at version 1), so recording
reads never contends with the patient's own writes.
"""

from __future__ import annotations

import hashlib
from uuid import uuid4

import numpy as np
import structlog

from contracts.bodies import Receipt
from contracts.codes import Purpose, ReadKind, Role
from contracts.events import OptOutFilterApplied, PersonalDataRead

from .commands import Caller
from .store import EventStore, NewEvent

# The response header naming the ledger position where this read was recorded.
READ_HEADER = "Ledger-Read-Recorded"


def _role(caller: Caller, allowed: frozenset[str]) -> Role:
    # The role that let the read through; several only if the token carries several.
    return sorted(caller.roles & allowed or caller.roles)[0]  # type: ignore[return-value]


def current_request_id() -> str | None:
    """The current request's id (bound by the HTTP middleware), to cross-reference logs."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


async def record_read(
    store: EventStore,
    caller: Caller,
    what: ReadKind,
    allowed: frozenset[str],
    *,
    nhs_number: str | None = None,
    first_position: int | None = None,
    last_position: int | None = None,
    entries: int = 0,
    cohort_id: str | None = None,
) -> Receipt:
    event = PersonalDataRead(
        what=what,
        role=_role(caller, allowed),
        recorded_by=caller.subject[:200],
        reader_org=caller.org,
        nhs_number=str(nhs_number) if nhs_number is not None else None,
        first_position=first_position,
        last_position=last_position,
        entries=entries,
        by_patient=nhs_number is not None and caller.nhs_number == nhs_number,
        request_id=current_request_id(),
        cohort_id=cohort_id,
    )
    result = await store.append([NewEvent(uuid4(), "PersonalDataRead", uuid4(), 1, event)])
    return result.receipts[0]


def submitted_sha256(stems: np.ndarray) -> str:
    """SHA-256 of a filter call's numbers: their stems as uint32 little-endian, in the order sent."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(stems, dtype="<u4"))).hexdigest()


async def record_filter_call(
    store: EventStore,
    caller: Caller,
    submitted: int,
    cohort_sha256: str,
    *,
    grant_id: str | None,
    purpose: Purpose | None,
    removed: int,
    as_of: int,
) -> Receipt:
    """Who checked how many patients, under which grant, against which state
    (``OptOutFilterApplied``: no NHS number, only a hash of the submitted list)."""
    assert caller.org is not None
    event = OptOutFilterApplied(
        recorded_by=caller.subject[:200],
        organisation_code=caller.org,
        submitted=submitted,
        removed=removed,
        as_of=as_of,
        cohort_sha256=cohort_sha256,
        grant_id=grant_id,
        purpose=purpose,
        request_id=current_request_id(),
    )
    result = await store.append([NewEvent(uuid4(), "OptOutFilterApplied", uuid4(), 1, event)])
    return result.receipts[0]
